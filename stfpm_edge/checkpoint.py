"""The self-contained checkpoint ``model.pt``: weights, configuration, preprocessing, thresholds, metrics.

A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)`` and anything
that needs more (a pickle with code in it) is refused.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import ModelFileError, StfpmError
from .fileio import atomic_write_bytes
from .model import STANDARDISED_LEVELS, STFPM, FeatureNorm, MapPost, MemoryBank, MemorySearch, WholePart, create_student
from .retired import removed_settings_on

FORMAT = "stfpm-edge/checkpoint/1"


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """torch.save, written atomically: a crash never leaves half a checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_checkpoint(path: str | Path, model: STFPM, meta: dict[str, Any]) -> None:
    payload = {
        "format": FORMAT,
        "tool_version": __version__,
        "teacher": {k: v.detach().cpu() for k, v in model.teacher.state_dict().items()},
        ("memory" if isinstance(model.student, MemoryBank) else "student"):
            {k: v.detach().cpu() for k, v in model.student.state_dict().items()},
        "meta": meta,
    }
    atomic_torch_save(path, payload)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"{path}: cannot read it as a stfpm-edge checkpoint ({_short(exc)}). It may be truncated, "
            "from another tool, or contain code, which is never loaded. Re-export it with stfpm-edge train."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: not a stfpm-edge checkpoint (format {found!r}, expected {FORMAT!r})")
    return payload


def load_checkpoint(path: str | Path) -> tuple[STFPM, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone (no network, no weight package needed)."""
    from . import backbones

    payload = read_checkpoint(path)
    meta = payload["meta"]
    name = meta["backbone"]
    problems = removed_settings_on({**(meta.get("config") or {}), **({"student_backbone": meta["student_backbone"]} if "student_backbone" in meta else {})}, name)
    if problems:
        raise ModelFileError(f"{path}: trained with an option this version no longer has: " + "; ".join(problems)
                             + ". Use the stfpm-edge version that trained it, or train it again")
    layers = meta.get("layers")  # absent in checkpoints from before levels were an option
    teacher = backbones.create_features(name, layers)
    norm = meta.get("feature_norm", "none")
    if norm != "none":  # standardised teacher levels: the statistics are in its state
        if norm not in STANDARDISED_LEVELS:
            raise ModelFileError(f"{path}: feature_norm {norm!r} is not one this version knows ({', '.join(STANDARDISED_LEVELS)}); "
                                 "a newer stfpm-edge wrote it")
        teacher = FeatureNorm.empty(teacher, STANDARDISED_LEVELS[norm])
    try:
        teacher.load_state_dict(payload["teacher"])
        if "memory" in payload:  # --reference memory: the teacher's good features instead of a student
            banks = payload["memory"]
            levels = sum(1 for k in banks if k.startswith("bank"))
            if not levels or not all(isinstance(banks.get(f"bank{k}"), torch.Tensor) for k in range(levels)):
                raise RuntimeError("memory bank levels missing")
            whole = None
            if isinstance(banks.get("whole.rows"), torch.Tensor):  # the whole-part term (models from before it have none)
                w = meta.get("memory_whole") or {}
                whole = WholePart(banks["whole.rows"], w.get("level", -1), w.get("offset", 0.0), w.get("gain", 0.0))
            student = MemoryBank([banks[f"bank{k}"] for k in range(levels)], MemorySearch.from_dict(meta.get("memory_search")), whole)
            if [b.shape[1] for b in student.banks()] != list(teacher.feature_info.channels()):
                raise RuntimeError(f"bank widths {[b.shape[1] for b in student.banks()]} differ from the teacher's levels")
        else:
            student = create_student(name, layers, teacher)
            student.load_state_dict(payload["student"])
    except (RuntimeError, AttributeError, StfpmError) as exc:
        raise ModelFileError(f"{path}: weights do not fit backbone {name!r}: {_short(exc)}") from None
    for p in teacher.parameters():
        p.requires_grad_(False)
    post = MapPost(**meta.get("map_post", {}))
    model = STFPM(name, teacher, student, post).eval().to(memory_format=torch.channels_last)
    return model, meta


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"[:300]
