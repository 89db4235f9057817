"""PyTorch backend: the checkpoint itself, the reference every other engine is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from .base import Engine, backend_options


class TorchEngine(Engine):
    name = "torch"
    OPTIONS = backend_options("torch")

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.model, meta = load_checkpoint(path)
        super().__init__(path, meta)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.batch_size = batch_size

    @classmethod
    def from_model(cls, model, meta: dict, batch_size: int = 16) -> "TorchEngine":
        """Wrap an in-memory model (training uses this before the checkpoint exists)."""
        self = cls.__new__(cls)
        self.model = model.eval()
        Engine.__init__(self, "<memory>", meta)
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        return self

    def _infer(self, frames: np.ndarray):
        maps, scores = [], []
        with torch.inference_mode():
            for i in range(0, len(frames), self.batch_size):
                x = torch.from_numpy(frames[i : i + self.batch_size]).to(self.device)
                m, s = self.model(x)
                maps.append(m[:, 0].float().cpu().numpy())
                scores.append(s.float().cpu().numpy())
        return np.concatenate(maps), np.concatenate(scores)
