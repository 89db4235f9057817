"""Training configuration: dataclass defaults (the paper's), overridden by a YAML file, then by flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import StfpmError
from .retired import REMOVED, removed_settings_on


@dataclass
class TrainConfig:
    data: str = ""
    out: str | None = None
    backbone: str = "tf_efficientnet_lite0"
    teacher_weights: str | None = None
    layers: str = ""  # feature levels (timm out_indices), e.g. "1,2,3"; empty = the backbone's default
    # model input size; 0 = chosen at training from the training images (geometry.auto_size: the default pixel count, 256 x 256,
    # at the images' aspect when they are far from square), then stored in the run's config and checkpoint
    height: int = 0
    width: int = 0
    resize: str = "squash"
    epochs: int = 100
    batch_size: int = 32
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    val_fraction: float = 0.1  # selects the checkpoint (lowest loss)
    calib_fraction: float = 0.1  # sets the threshold; 0 = the validation split does both (biased low)
    select: str = "best"  # best (lowest validation loss) or last epoch
    seed: int = 0
    augment: str = "rotate"  # none, flip, rot90 (flips and quarter turns), rotate (any angle, small shifts)
    amp: str = "off"  # off, bf16 (CPU autocast), fp16 (CUDA autocast), auto (bf16/fp16 where the device has it)
    blur_sigma: float = 4.0  # Gaussian smoothing of the anomaly map, model-input pixels (0 = the paper's raw map)
    # image score = mean of this fraction of the map's top pixels (0 = its maximum, the paper's). 1 % against the maximum, at the tool's
    # own threshold: transistor passes 7 of 40 defects instead of 15, screw 76 of 119 instead of 71, bottle none either way
    # (docs/results.md "The image score")
    topk_fraction: float = 0.01
    level_weights: str = ""  # one exponent per level in the map's product, e.g. "0,0,1" (the deepest level alone); empty = all 1 (the paper)
    cache_teacher: bool = True
    # a student's levers (the paper: constant, 0, none, every level 1). A student that is not told otherwise gets
    # STUDENT_DEFAULTS (what won on screw and bottle: docs/results.md); the defaults here are the memory's
    lr_schedule: str = "constant"  # constant (the paper) or decay (constant, then linear over the last fifth; a student's default)
    hard_fraction: float = 0.0  # > 0: only this fraction of positions with the largest distances trains the student (EfficientAD)
    # none (the paper), channel: teacher features standardised per channel with good-image statistics, compared by l2
    # (EfficientAD); deep: only the deepest level standardised (a student's default)
    feature_norm: str = "none"
    # memory: a coreset of the teacher's own good features (the default: far better on hard parts, no epochs, docs/results/record.md "Hard parts");
    # student: the paper's student network, trained for `epochs` (3.5-5x less inference time on a CPU)
    reference: str = "memory"
    bank_size: str = "32768"  # memory: rows per feature level, one number for all or one per level ("4096,16384,32768")
    # memory: per level, average k x k blocks of features before the search ("2,2,1"); auto = 2 for the levels finer than
    # stride 16, 1 for the others (strides 4, 8, 16 are searched at 8, 16, 16: docs/results/record.md "Memory at camera rate"); 1 = none
    memory_pool: str = "auto"
    memory_aggregate: int = 1  # memory: each feature the mean of its a x a neighbourhood first (PatchCore; 1 = none)
    # memory: weight of the whole-part term (model.WholePart: each cell of a coarse grid against that cell of the good images,
    # counted only beyond good variation, added to the map; marks a missing or turned part) in the map; 0 = positions only.
    # docs/results/record.md "The whole part"
    whole_weight: float = 0.5
    # the share of good parts the line may reject; the threshold is set for it from out-of-fold good scores (thresholds.py)
    false_call_rate: float = 0.01
    threshold_rule: str = "tail"  # tail (generalised Pareto fit of the top good scores) or quantile (empirical)
    threads: int = 0
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    overlays: int = 12

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


REFERENCES = ("student", "memory")

# A new student run's settings where neither a flag nor the --config file sets them (a resumed run keeps its own): the
# hard-feature loss, the deepest level standardised (the finer levels raw, by the cosine), an image score that is the mean of
# the map's top 1%, a map whose finer levels weigh STUDENT_FINE_WEIGHT against the deepest level's 1, a rate that decays over
# the last fifth of the epochs with the trained weights kept, and batches of 16. Measured on screw and bottle, each lever
# against the one before on the same seeds: docs/results.md "The student, reproduced" (screw 0.937-0.943 image, 0.992-0.993
# pixel AUROC over three trainings; bottle pixel 0.9892-0.9901). configs/paper.yaml sets the paper's.
STUDENT_DEFAULTS: dict[str, Any] = {"hard_fraction": 0.1, "feature_norm": "deep", "lr_schedule": "decay", "batch_size": 16}
STUDENT_FINE_WEIGHT = 0.25
# every setting a new student run takes from this module rather than from TrainConfig (whose values are the paper's)
STUDENT_LEVERS = (*STUDENT_DEFAULTS, "level_weights")


def student_level_weights(levels: int) -> str:
    """The student's default map weights for ``levels`` feature levels: the finer ones STUDENT_FINE_WEIGHT, the deepest 1."""
    return ",".join([f"{STUDENT_FINE_WEIGHT:g}"] * (levels - 1) + ["1"])


def _coerce(name: str, value: Any, default: Any) -> Any:
    if value is None or default is None:
        return value
    kind = type(default)
    if kind in (int, float) and isinstance(value, bool):
        raise StfpmError(f"config: {name} must be a number, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise StfpmError(f"config: {name} must be a whole number, got {value!r}")
    if name == "augment" and isinstance(value, bool):  # older configs: augment: true meant flips
        return "flip" if value else "none"
    if name in ("layers", "level_weights") and isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise StfpmError(f"config: {name} must be true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise StfpmError(f"config: {name} must be {kind.__name__}, got {value!r}") from None


# what may change when a run is resumed: how long and where it runs, not what it learns
RESUME_MAY_CHANGE = ("epochs", "threads", "device", "overlays", "out")


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping of option: value; any problem is one line naming the file, the line and what to do."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        if "python/" in problem:  # a tag that would build Python objects: never run, plainly refused
            problem = "a !!python tag is not allowed (a config is plain options and values; it never runs code)"
        raise StfpmError(f"{path}{where}: not valid YAML: {problem}; fix that line and try again") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StfpmError(f"{path}: cannot be read as a text config ({exc.__class__.__name__})") from None
    if not isinstance(loaded, dict):
        raise StfpmError(f"{path}: expected a mapping of option: value")
    return loaded


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, stored: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then ``stored`` (a resumed run's own config.json), then the YAML file, then flags.

    A new student run (not resumed) takes STUDENT_DEFAULTS and ``student_level_weights`` for what none of them sets.

    When resuming, a file or flag that contradicts the stored value of a setting that shapes the
    model is an error naming both values.
    """
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(TrainConfig)}
    if stored:
        problems = removed_settings_on(stored, stored.get("backbone"))
        if problems:
            raise StfpmError("--resume: this run was started with an option this version no longer has: " + "; ".join(problems)
                             + ". Start a new run")
        stored = {"reference": "student", **stored}  # runs from before the memory reference were all students
        values.update({k: v for k, v in stored.items() if k in known})
        defaults_now = TrainConfig()
        given: dict[str, Any] = {}
        if path is not None and Path(path).is_file():
            given.update(read_yaml(Path(path)))
        given.update({k: v for k, v in (overrides or {}).items() if v is not None})
        for k, v in given.items():
            if k in known and k not in RESUME_MAY_CHANGE and k in stored:
                ours = _coerce(k, v, getattr(defaults_now, k))
                if ours != _coerce(k, stored[k], getattr(defaults_now, k)) and not (k == "data" and Path(str(ours)).resolve() == Path(str(stored[k])).resolve()):
                    raise StfpmError(f"--resume: {k} was {stored[k]!r} in this run, now {ours!r}; a resumed run keeps its settings "
                                     "(only epochs, threads, device and overlays may change); start a new run to change it")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise StfpmError(f"{path}: config file not found")
        loaded = read_yaml(path)
        for name in sorted(set(loaded) & set(REMOVED)):
            if REMOVED[name][0] is None:
                raise StfpmError(f"{path}: {name} is no longer an option: {REMOVED[name][1]}")
        problems = removed_settings_on(loaded, loaded.get("backbone", TrainConfig.backbone))
        if problems:
            raise StfpmError(f"{path}: " + "; ".join(problems))
        loaded = {k: v for k, v in loaded.items() if k not in REMOVED}
        unknown = sorted(set(loaded) - set(known))
        if unknown:
            raise StfpmError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values.update(loaded)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    problems = removed_settings_on({k: v for k, v in overrides.items() if REMOVED.get(k, (0,))[0] is not None}, overrides.get("backbone", TrainConfig.backbone))
    gone = [f"{k} is no longer an option: {REMOVED[k][1]}" for k in overrides if REMOVED.get(k, (0,))[0] is None]
    if problems or gone:
        raise StfpmError("; ".join(problems + gone))
    values.update({k: v for k, v in overrides.items() if k not in REMOVED})
    defaults = TrainConfig()
    # a resumed run keeps what it was trained with: a setting its config.json lacks predates these defaults (the paper's)
    student = values.get("reference", defaults.reference) == "student" and not stored
    if student:
        values = {**STUDENT_DEFAULTS, **values}
    cfg = TrainConfig(**{k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()})
    if not cfg.data:
        raise StfpmError("no data set given: pass --data DIR (or data: in the --config file)")
    if student and "level_weights" not in values:
        from .backbones import resolve_layers

        cfg.level_weights = student_level_weights(len(resolve_layers(cfg.backbone, parse_layers(cfg.layers))))
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise StfpmError("epochs and batch size must be at least 1")
    parse_counts("bank_size", cfg.bank_size)
    parse_weights(cfg.level_weights)
    if cfg.memory_pool != "auto":
        parse_counts("memory_pool", cfg.memory_pool)
    if cfg.memory_aggregate < 1 or cfg.memory_aggregate % 2 == 0:
        raise StfpmError(f"config: memory_aggregate must be an odd number (1, 3, 5), got {cfg.memory_aggregate}")
    if not 0.0 <= cfg.whole_weight <= 100.0:
        raise StfpmError(f"config: whole_weight must be in [0, 100] (0 = no whole-part term), got {cfg.whole_weight}")
    if not 0.0 <= cfg.hard_fraction < 1.0:
        raise StfpmError(f"config: hard_fraction must be in [0, 1), got {cfg.hard_fraction}")
    for name, allowed in (("augment", AUGMENTS), ("amp", AMP_MODES), ("select", ("best", "last")), ("reference", REFERENCES),
                          ("lr_schedule", LR_SCHEDULES), ("feature_norm", feature_norms())):
        if getattr(cfg, name) not in allowed:
            raise StfpmError(f"config: {name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name, off in (("feature_norm", "none"),):
        if getattr(cfg, name) != off and cfg.reference != "student":
            raise StfpmError(f"config: {name} applies to a student (reference: student); a {cfg.reference} reference has no student network")
    from .thresholds import THRESHOLD_RULES, check_false_call_rate

    check_false_call_rate(cfg.false_call_rate)
    if cfg.threshold_rule not in THRESHOLD_RULES:
        raise StfpmError(f"config: threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, got {cfg.threshold_rule!r}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise StfpmError(f"config: val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    if cfg.lr <= 0 or cfg.threads < 0 or cfg.overlays < 0:
        raise StfpmError("config: lr must be positive; threads and overlays not negative")
    if not 0.0 <= cfg.calib_fraction < 1.0 or cfg.val_fraction + cfg.calib_fraction >= 1.0:
        raise StfpmError(f"config: val_fraction + calib_fraction must leave images to train on (got {cfg.val_fraction} + {cfg.calib_fraction})")
    return cfg


AUGMENTS = ("none", "flip", "rot90", "rotate")
AMP_MODES = ("off", "bf16", "fp16", "auto")
LR_SCHEDULES = ("constant", "decay")


def feature_norms() -> tuple[str, ...]:
    """--feature-norm's choices: none, or a name of model.STANDARDISED_LEVELS (imported here, not at the top: it loads torch)."""
    from .model import STANDARDISED_LEVELS

    return ("none", *STANDARDISED_LEVELS)


def parse_layers(text: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise StfpmError(f"layers must be comma-separated level indices such as 1,2,3, got {text!r}") from None


def parse_weights(text: str) -> tuple[float, ...]:
    """"0,0,1" -> (0.0, 0.0, 1.0); "" -> () (every level weighs 1). Ranges are checked by ``MapPost``."""
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise StfpmError(f"level weights must be comma-separated numbers, one per feature level, such as 0,0,1; got {text!r}") from None


def parse_counts(name: str, text: str) -> tuple[int, ...]:
    """"32768" or "4096,16384,32768" -> whole numbers of at least 1 (one for all levels, or one per level)."""
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        values = ()
    if (str(text).strip() and not values) or any(v < 1 for v in values):
        raise StfpmError(f"config: {name} must be a whole number of at least 1, or one per level such as 4096,16384,32768; got {text!r}")
    return values


def per_level(values: tuple[int, ...], levels: int, default: int) -> list[int]:
    """One value per level from ``parse_counts``: a single value applies to every level."""
    if not values:
        return [default] * levels
    if len(values) == 1:
        return list(values) * levels
    if len(values) != levels:
        raise StfpmError(f"{len(values)} values given ({','.join(map(str, values))}) for {levels} feature levels; give one, or one per level")
    return list(values)
