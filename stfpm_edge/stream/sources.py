"""Capture sources behind one small interface: ``read() -> Frame | None`` (None = end of stream).

Kinds: camera index, video file, RTSP/HTTP URL, GStreamer pipeline, image folder or glob, and an
in-memory iterator (generated data, tests). Live sources (cameras, URLs, pipelines) may drop
frames under load; files and folders never do.
"""

from __future__ import annotations

import glob as globmod
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from ..errors import DataError, StfpmError
from ..fileio import mask_secrets
from ..geometry import IMAGE_SUFFIXES, decode_image, to_bgr8


class SourceError(StfpmError):
    """A source cannot be opened (or reopened)."""


@dataclass
class Frame:
    index: int  # position in the source, counting undecodable frames too
    image: np.ndarray | None  # BGR uint8; None when the frame could not be decoded
    timestamp: float  # seconds: the source's own clock where it has one, else arrival time
    name: str = ""
    error: str | None = None


class Source:
    live = False
    kind = "source"

    def __init__(self, spec: str):
        self.spec = spec
        self._index = 0

    def describe(self) -> str:
        return f"{self.kind} {mask_secrets(self.spec)}"

    def read(self) -> Frame | None:
        raise NotImplementedError

    def reopen(self) -> bool:
        return False

    def abandon(self) -> None:
        """A read is stuck in this source (another thread waits in it): let go of what it holds without touching it."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CaptureSource(Source):
    """Anything cv2.VideoCapture opens: camera index, video file, URL, GStreamer pipeline."""

    def __init__(self, spec: str, kind: str, live: bool, target, api: int = cv2.CAP_ANY):
        super().__init__(spec)
        self.kind, self.live, self._target, self._api = kind, live, target, api
        self._t0 = time.time()
        self._cap = self._open()
        if self._cap is None:
            hint = {"camera": "check the index (0, 1, ...) and that no other program holds the camera",
                    "stream": "check the URL, credentials and network",
                    "gstreamer": "check the pipeline with gst-launch-1.0 and that OpenCV was built with GStreamer",
                    "video": "check that the file exists and is a video OpenCV can decode"}[kind]
            raise SourceError(f"cannot open {self.describe()}: {hint}")

    def _open(self):
        # OpenCV logs every backend it tries when a device is missing; our error says it once
        log = getattr(cv2.utils, "logging", None)  # OpenCV 5; 4.x builds may lack it (then OpenCV may say more)
        level = log.getLogLevel() if log is not None else None
        if log is not None:
            log.setLogLevel(log.LOG_LEVEL_SILENT)
        try:
            cap = cv2.VideoCapture(self._target, self._api)
        finally:
            if log is not None:
                log.setLogLevel(level)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def read(self) -> Frame | None:
        cap = self._cap
        if cap is None:
            return None
        ok, img = cap.read()
        if cap is not self._cap:  # abandoned while this read hung (a stall): its handle is released here, by its own thread
            cap.release()
            return None
        if not ok or img is None:
            return None
        idx = self._index
        self._index += 1
        if self.kind == "video":
            pos = self._cap.get(cv2.CAP_PROP_POS_MSEC)
            ts = pos / 1e3 if pos and pos > 0 else idx / max(self._cap.get(cv2.CAP_PROP_FPS) or 25.0, 1e-6)
        else:
            ts = time.time()
        return Frame(idx, to_bgr8(img, self.spec), ts, f"{idx:06d}")

    def reopen(self) -> bool:
        if self._cap is not None:
            self._cap.release()
        self._cap = self._open()
        return self._cap is not None

    def abandon(self) -> None:
        """A read is stuck in the current handle: forget it (the stuck read releases it if it returns); ``reopen`` opens anew."""
        self._cap = None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FilesSource(Source):
    """Image files in order; an undecodable file is a Frame with ``error`` set (counted, skipped)."""

    kind = "images"

    def __init__(self, spec: str, files: list[Path]):
        super().__init__(spec)
        if not files:
            raise SourceError(f"no images found for {spec} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.files = files

    def read(self) -> Frame | None:
        if self._index >= len(self.files):
            return None
        idx = self._index
        self._index += 1
        path = self.files[idx]
        try:
            return Frame(idx, decode_image(path), float(idx), str(path))
        except DataError as exc:
            return Frame(idx, None, float(idx), str(path), error=str(exc))


class IterSource(Source):
    """Frames from a Python iterable of BGR images (generated data, tests)."""

    kind = "generated"

    def __init__(self, frames: Iterable[np.ndarray], spec: str = "generated", live: bool = False, fps: float | None = None):
        super().__init__(spec)
        self._it: Iterator[np.ndarray] = iter(frames)
        self.live = live
        self._fps = fps

    def read(self) -> Frame | None:
        try:
            img = next(self._it)
        except StopIteration:
            return None
        idx = self._index
        self._index += 1
        if self._fps:
            time.sleep(1.0 / self._fps)
        return Frame(idx, img, idx / self._fps if self._fps else float(idx), f"{idx:06d}")


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def open_source(spec: str) -> Source:
    """Pick the source kind from the spec's form."""
    spec = str(spec)
    if spec.isdigit():
        return CaptureSource(spec, "camera", True, int(spec))
    if "!" in spec:  # a GStreamer pipeline, e.g. nvarguscamerasrc ! ... ! appsink
        return CaptureSource(spec, "gstreamer", True, spec, cv2.CAP_GSTREAMER)
    if _URL.match(spec):
        return CaptureSource(spec, "stream", True, spec, cv2.CAP_FFMPEG)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return FilesSource(spec, files)
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in globmod.glob(spec, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        return FilesSource(spec, files)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return FilesSource(spec, [path])
        return CaptureSource(spec, "video", False, str(path))
    raise SourceError(f"source {mask_secrets(spec)!r} is not a camera index, URL, GStreamer pipeline, folder, glob or existing file")
