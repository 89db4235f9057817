"""Options that left the product, and why: one list, read by the config loader, resume and the checkpoint loader.

A config file, a resumed run or a checkpoint that names one at its "off" value still loads (the
setting changed nothing); one that had it on is refused with the reason, since this version cannot
reproduce what it did. The measurements that retired them are in docs/results.md. Torch-free.
"""

from __future__ import annotations

from typing import Any

# name -> (the value that meant "off", or None for an option with no off value; why it left)
REMOVED: dict[str, tuple[Any, str]] = {
    "synthetic": (0.0, "synthetic defects with the clean teacher as target lowered screw's image AUROC at 30 epochs "
                       "(0.617 against 0.637 without)"),
    "memory_target": (0.0, "the memory as a second teacher signal moved screw by +0.003 against its control (0.915 / 0.912) and "
                           "lowered bottle's pixel AUROC to 0.9828, under the default trainings' 0.9848-0.9859"),
    "average_epochs": (0.0, "averaged weights lost to the decaying rate with the trained weights on the same screw trajectories "
                            "(0.938 / 0.946 / 0.940 against 0.918-0.926)"),
    "student_backbone": ("", "a deeper lite1 student gained nothing (screw 0.888 within the defaults' 0.830-0.923, bottle pixel 0.9845 "
                             "under five of six default trainings) at 1.13-1.17x the time per frame"),
    "threshold_quantile": (None, "the threshold is set for a false-call rate now (false_call_rate: 0.01 is about quantile 0.99)"),
}

# values that left an option that stays: option -> {value: why}
REMOVED_VALUES: dict[str, dict[Any, str]] = {
    "lr_schedule": {"cosine": "cosine decay lowered screw's image AUROC at 30 epochs (0.573 against 0.637 at a constant rate); "
                              "the student's schedule is decay"},
}


def removed_settings_on(settings: dict[str, Any], backbone: str | None = None) -> list[str]:
    """The removed options that ``settings`` (a config dict) had on, each with why it left; [] when all were off."""
    out = []
    for name, (off, why) in REMOVED.items():
        if name not in settings or off is None:
            continue
        value = settings[name]
        if name == "student_backbone" and value in ("", None, backbone):
            continue
        if value not in (off, None) and not (isinstance(off, float) and isinstance(value, (int, float)) and float(value) == off):
            out.append(f"{name} {value!r} is no longer an option: {why}")
    for name, values in REMOVED_VALUES.items():
        if settings.get(name) in values:
            out.append(f"{name} {settings[name]!r} is no longer a choice: {values[settings[name]]}")
    return out
