"""Disk-backed training data: fitted images and the frozen teacher's features, read batch by batch.

A line collects thousands of good images and a Jetson shares 8-16 GB between CPU and GPU, so
training does not hold the decoded images or the teacher's features in memory. Each is a file of
fixed-size records in a temporary folder, written once and read with ``pread`` per batch: the
bytes go through the page cache (which the kernel reclaims under pressure) rather than the
process's own memory, so resident memory stays flat as the image count grows.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .datasets import fitted_images
from .geometry import Geometry


class RecordFile:
    """Fixed-shape records in one raw file; array-like for reading (``len``, ``[i]``, ``[slice]``, ``[indices]``)."""

    def __init__(self, path: Path, shape: Sequence[int], dtype):
        self.path = Path(path)
        self.shape1 = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.record_bytes = int(np.prod(self.shape1)) * self.dtype.itemsize
        self._n = 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self.shape1)

    def __len__(self) -> int:
        return self._n

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1, *self.shape1)
        data = rows.tobytes()
        written = os.pwrite(self._fd, data, self._n * self.record_bytes)
        if written != len(data):
            raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes); is the disk full?")
        self._n += len(rows)

    def _read(self, i: int, count: int) -> bytes:
        data = os.pread(self._fd, count * self.record_bytes, i * self.record_bytes)
        if len(data) != count * self.record_bytes:
            raise OSError(f"{self.path}: short read at record {i}")
        return data

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            count = max(0, stop - start)
            return np.frombuffer(self._read(start, count), self.dtype).reshape(count, *self.shape1).copy() if count else np.empty((0, *self.shape1), self.dtype)
        idx = np.asarray(key)
        if idx.ndim == 0:
            return self[int(idx) : int(idx) + 1][0]
        out = np.empty((len(idx), *self.shape1), self.dtype)
        for k, i in enumerate(idx.tolist()):
            if not -self._n <= i < self._n:
                raise IndexError(f"record {i} out of range ({self._n})")
            out[k] = np.frombuffer(self._read(i % self._n, 1), self.dtype).reshape(self.shape1)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TrainingStore:
    """A temporary folder of record files, removed on ``close`` (also after a crash of the block)."""

    def __init__(self, prefix: str = "stfpm-train-"):
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.folder = Path(self._tmp.name)
        self._files: list[RecordFile] = []

    def records(self, name: str, shape: Sequence[int], dtype) -> RecordFile:
        f = RecordFile(self.folder / f"{name}.bin", shape, dtype)
        self._files.append(f)
        return f

    def images(self, name: str, items: Sequence, geometry: Geometry, progress: bool = False, desc: str = "images") -> RecordFile:
        """Decode and fit every sample or image path (a bad file raises here, naming it) into a record file."""
        out = self.records(name, (geometry.height, geometry.width, 3), np.uint8)
        for fitted, _ in fitted_images(items, geometry, progress, desc):
            out.append(fitted[None])
        return out

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._tmp.cleanup()

    def __enter__(self) -> "TrainingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
