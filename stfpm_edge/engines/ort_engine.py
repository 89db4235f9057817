"""ONNX Runtime backend. Imports neither torch nor tensorrt (the CPU deploy path stays light)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from ..onnxmeta import metadata_from_props
from .base import Engine, backend_options


def read_onnx_metadata(session, path: Path) -> dict:
    return metadata_from_props(session.get_modelmeta().custom_metadata_map, path)


class OrtEngine(Engine):
    name = "onnxruntime"
    OPTIONS = backend_options("onnxruntime")

    def __init__(self, path: str | Path, threads: int = 0, providers: list[str] | None = None):
        import onnxruntime as ort

        path = Path(path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: not a warning per folded constant
        if threads > 0:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelFileError(f"{path}: ONNX Runtime cannot load it ({exc.__class__.__name__}: {str(exc)[:300]})") from None
        super().__init__(path, read_onnx_metadata(self.session, path))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.static_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.output_names = ["anomaly_map", "score"]
        have = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in self.output_names if n not in have]
        if missing or inp.type != "tensor(uint8)" or len(inp.shape) != 4:
            raise ModelFileError(f"{path}: carries stfpm-edge metadata but is not an stfpm-edge graph (input {inp.name} {inp.type} "
                                 f"{inp.shape}, outputs {sorted(have)}; expected uint8 [N,H,W,3] frames -> anomaly_map, score); re-export it")

    def close(self) -> None:
        self.session = None

    def _infer(self, frames: np.ndarray):
        b = self.static_batch or len(frames)
        maps, scores = [], []
        for i in range(0, len(frames), b):
            chunk = frames[i : i + b]
            n = len(chunk)
            if n < b:  # a static-batch graph: pad the last chunk, drop the padding's outputs
                chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
            m, s = self.session.run(self.output_names, {self.input_name: chunk})
            maps.append(m[:n])
            scores.append(s[:n])
        return np.concatenate(maps), np.concatenate(scores)
