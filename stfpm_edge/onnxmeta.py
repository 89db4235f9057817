"""The conventions of our ONNX files, defined once and torch-free: where the metadata lives, how it is
read and written, and which nodes form the FP32 head. Export, calibration, the ONNX Runtime engine and
the TensorRT builder all use these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelFileError
from .fileio import atomic_write_bytes, atomic_write_json, sha256_file, sidecar_path

META_KEY = "stfpm_edge"


def is_head_node(name: str) -> bool:
    """Nodes outside the two backbones: preprocessing and the anomaly-map head (kept in FP32)."""
    return not (name.startswith("/model/teacher/") or name.startswith("/model/student/"))


def metadata_from_props(props: Mapping[str, str], path: Path) -> dict[str, Any]:
    """Our metadata from an ONNX file's ``metadata_props``; a clear error when it is missing."""
    if META_KEY not in props:
        raise ModelFileError(
            f"{path}: this ONNX file has no stfpm-edge metadata (input size, colour order, threshold); "
            "export it with `stfpm-edge export MODEL.pt`"
        )
    try:
        return json.loads(props[META_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: stfpm-edge metadata is not valid JSON ({exc})") from None


def save_onnx(proto, path: Path, meta: dict[str, Any]) -> None:
    """Write the model with its metadata in ``metadata_props`` and a JSON sidecar, both atomically."""
    import onnx

    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    atomic_write_json(sidecar_path(path), {**meta, "onnx_sha256": sha256_file(path)})
