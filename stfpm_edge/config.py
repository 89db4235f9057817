"""Training configuration: dataclass defaults (the paper's), overridden by a YAML file, then by flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import StfpmError


@dataclass
class TrainConfig:
    data: str = ""
    out: str | None = None
    backbone: str = "tf_efficientnet_lite0"
    teacher_weights: str | None = None
    layers: str = ""  # feature levels (timm out_indices), e.g. "1,2,3"; empty = the backbone's default
    height: int = 256
    width: int = 256
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
    topk_fraction: float = 0.0  # image score = mean of this fraction of the top map pixels; 0 = max
    level_weights: str = ""  # one exponent per level in the map's product, e.g. "0,0,1" (the deepest level alone); empty = all 1 (the paper)
    cache_teacher: bool = True
    # student levers (issue 17; the paper: constant, 0, 0, none, every level 1): README "The student, reproduced". A student
    # that is not told otherwise gets STUDENT_DEFAULTS (what won on screw and bottle); the defaults here are the memory's
    lr_schedule: str = "constant"  # constant (the paper), cosine (decays to 0 over the epochs), decay (linear over the last fifth; a student's default)
    hard_fraction: float = 0.0  # > 0: only this fraction of positions with the largest distances trains the student (EfficientAD)
    synthetic: float = 0.0  # share of each batch given a synthetic defect; the student must answer the teacher's features of the clean image
    student_backbone: str = ""  # the student's network; empty = the teacher's (the paper); it must give the teacher's level widths
    # none (the paper) or channel: teacher features standardised per channel with good-image statistics, compared by l2 (EfficientAD)
    feature_norm: str = "none"
    # > 0: the student validated, kept and exported is the exponential moving average of its weights over about this many
    # epochs (its window, in optimiser steps: this times the steps of one epoch); 0 = the trained weights themselves (the paper)
    average_epochs: float = 0.0
    # > 0: at the deepest level the student also regresses, with this weight, the nearest good feature of the *other*
    # training images (a memory of teacher features searched at training time only; nothing of it is exported)
    memory_target: float = 0.0
    # memory: a coreset of the teacher's own good features (the default: far better on hard parts, no epochs, README "Hard parts");
    # student: the paper's student network, trained for `epochs` (3.5-5x less inference time on a CPU)
    reference: str = "memory"
    bank_size: str = "32768"  # memory: rows per feature level, one number for all or one per level ("4096,16384,32768")
    # memory: per level, average k x k blocks of features before the search ("2,2,1"); auto = 2 for the levels finer than
    # stride 16, 1 for the others (strides 4, 8, 16 are searched at 8, 16, 16: README "Memory at camera rate"); 1 = none
    memory_pool: str = "auto"
    memory_aggregate: int = 1  # memory: each feature the mean of its a x a neighbourhood first (PatchCore; 1 = none)
    # the share of good parts the line may reject; the threshold is set for it from out-of-fold good scores (thresholds.py)
    false_call_rate: float = 0.005
    threshold_rule: str = "tail"  # tail (generalised Pareto fit of the top good scores) or quantile (empirical)
    threads: int = 0
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    overlays: int = 12

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


REFERENCES = ("student", "memory")

# A new student run's settings where neither a flag nor the --config file sets them (a resumed run keeps its own): the
# hard-feature loss and standardised features (the deepest level), an image score that is the mean of the map's top 1%, a map whose finer
# levels weigh STUDENT_FINE_WEIGHT against the deepest level's 1, a rate that decays over the last fifth of the epochs
# with the trained weights kept (session 15: screw 0.934-0.946 / 0.990-0.992 over five trainings at batch 32, where the
# defaults of sessions 10-14, a constant rate with averaged weights, gave 0.830-0.923), and batches of 16: twice the
# paper's steps per epoch at the same cost per epoch (session 16: screw 0.948 / 0.951 / 0.945 against 0.938 / 0.946 /
# 0.940 at 32 on the same seeds; bottle pixel 0.983-0.986, mean 0.9844 against batch 32's 0.9852). Since session 18 only
# the deepest level is standardised (feature_norm "deep"; the finer levels raw, by the cosine): bottle pixel 0.9894 / 0.9901
# against 0.9834-0.9856 with every level standardised, screw 0.943 / 0.943 / 0.937 image (0.948 / 0.951 / 0.945 on the same
# seeds) and 0.9921-0.9928 pixel. README "The student, reproduced". configs/paper.yaml sets the paper's.
STUDENT_DEFAULTS: dict[str, Any] = {"hard_fraction": 0.1, "feature_norm": "deep", "topk_fraction": 0.01, "lr_schedule": "decay",
                                    "batch_size": 16}
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


# options that left the product, and what replaced them (a config file that names one is refused with this)
REMOVED = {"threshold_quantile": "the threshold is set for a false-call rate now (false_call_rate: 0.01 is about quantile 0.99)"}

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
            raise StfpmError(f"{path}: {name} is no longer an option: {REMOVED[name]}")
        unknown = sorted(set(loaded) - set(known))
        if unknown:
            raise StfpmError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
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
    if not 0.0 <= cfg.average_epochs <= cfg.epochs:
        raise StfpmError(f"config: average_epochs must be in [0, epochs ({cfg.epochs})], got {cfg.average_epochs}")
    if cfg.memory_target < 0:
        raise StfpmError(f"config: memory_target must not be negative, got {cfg.memory_target}")
    if not 0.0 <= cfg.hard_fraction < 1.0 or not 0.0 <= cfg.synthetic <= 1.0:
        raise StfpmError(f"config: hard_fraction must be in [0, 1) and synthetic in [0, 1], got {cfg.hard_fraction} and {cfg.synthetic}")
    for name, allowed in (("augment", AUGMENTS), ("amp", AMP_MODES), ("select", ("best", "last")), ("reference", REFERENCES),
                          ("lr_schedule", LR_SCHEDULES), ("feature_norm", feature_norms())):
        if getattr(cfg, name) not in allowed:
            raise StfpmError(f"config: {name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    for name, off in (("student_backbone", ""), ("feature_norm", "none"), ("average_epochs", 0.0), ("memory_target", 0.0)):
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
LR_SCHEDULES = ("constant", "cosine", "decay")


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
