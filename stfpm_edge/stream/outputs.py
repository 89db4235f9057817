"""Outputs of a run: the JSONL record of every frame, the annotated picture, video, anomaly files, a window.

Each output is a small object with ``write(inspection, picture)`` and ``close()``; the pipeline's
output stage calls every output for every inspected frame. A new output (a message-bus sink, a web
view) is one more class here, not an edit inside the loop. ``Picture`` draws the heat overlay at
most once per frame, and only when some output asks for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..fileio import atomic_write_bytes, pid_alive
from ..render import annotate, heat_overlay
from ..scoring import ANOMALOUS, normalized_score
from .inspection import Inspection, crop


class RunFolder:
    """A run folder belongs to one run: refused when another run's results are in it, locked while alive.

    The lock is a file holding the owner's PID, created exclusively; a lock whose process is gone
    (a crash, kill -9) is taken over.
    """

    RESULTS = ("frames.jsonl", "tiles.jsonl", "summary.json")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = self.path / ".run.lock"
        self._held = False

    def __enter__(self) -> "RunFolder":
        from ..errors import StfpmError

        if self.path.exists() and not self.path.is_dir():
            raise StfpmError(f"{self.path}: --out names a file; give a folder for the run's results")
        self.path.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read_pid(self.lock)
                if owner is not None and pid_alive(owner):
                    raise StfpmError(f"{self.path}: another run (PID {owner}) is writing here; give this run its own --out") from None
                self.lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._held = True
            break
        taken = [n for n in self.RESULTS if (self.path / n).exists()]
        if taken:
            self.__exit__()
            raise StfpmError(f"{self.path}: holds the results of an earlier run ({', '.join(taken)}); "
                             "choose another --out (the default makes a new folder per run)")
        return self

    def __exit__(self, *exc) -> None:
        if self._held:
            self.lock.unlink(missing_ok=True)
            self._held = False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


class JsonlWriter:
    """One JSON object per line, flushed as written: a crash leaves whole lines only.

    A write that fails (a full disk) is cut back to the last whole line, counted in ``lost`` and
    reported once in ``error``; the writer keeps trying with the next record, so records resume
    as soon as space returns.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._end = 0
        self.lost = 0
        self.error: str | None = None

    def write(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode("utf-8")
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], self._end + done)
            self._end += len(data)
        except OSError as exc:
            self.lost += 1
            self.error = self.error or f"{self.path}: {exc.strerror or exc}"
            try:
                os.ftruncate(self._fd, self._end)  # never a partial last line
            except OSError:
                pass

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1


class Picture:
    """The annotated frame of an inspection: heat map over the (ROI of the) source frame, verdict label."""

    def __init__(self, insp: Inspection, geometry, threshold: float, roi):
        self.insp, self.geometry, self.threshold, self.roi = insp, geometry, threshold, roi
        self._vis: np.ndarray | None = None
        self._map: np.ndarray | None = None

    @property
    def source_map(self) -> np.ndarray:
        """The anomaly map over the ROI at source resolution."""
        if self._map is None:
            region = crop(self.insp.frame.image, self.roi)
            self._map = self.geometry.unfit_map(self.insp.result.map, *region.shape[:2])
        return self._map

    @property
    def image(self) -> np.ndarray:
        if self._vis is None:
            frame, r = self.insp.frame, self.insp.result
            region = crop(frame.image, self.roi)
            vis = frame.image.copy()
            x, y = (self.roi[0], self.roi[1]) if self.roi else (0, 0)
            vis[y : y + region.shape[0], x : x + region.shape[1]] = heat_overlay(region, self.source_map, self.threshold)
            if self.roi:
                cv2.rectangle(vis, (x, y), (x + region.shape[1], y + region.shape[0]), (255, 255, 255), 1)
            bad = r.verdict == ANOMALOUS
            annotate(vis, f"#{frame.index} score {r.score:.4g} ({r.normalized_score:.2f}) {'ANOMALOUS' if bad else 'good'}", bad)
            self._vis = vis
        return self._vis


def anomaly_stem(insp: Inspection) -> str:
    """The file stem of an anomalous frame's pictures: ``000123``, or ``s1-000123`` in a run with several sources."""
    return f"{insp.frame.index:06d}" if insp.source_name is None else f"s{insp.source}-{insp.frame.index:06d}"


class Output:
    def write(self, insp: Inspection, picture: Picture) -> None:
        raise NotImplementedError

    def event(self, record: dict) -> None:
        """A run event that is not a frame (drift raised or cleared); outputs that tell someone override this."""

    def close(self) -> None:
        pass


VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


def check_video_path(path: Path) -> None:
    """Refuse a --save-video target that cannot become a video, before the run starts."""
    from ..errors import StfpmError

    path = Path(path)
    if path.is_dir():
        raise StfpmError(f"--save-video {path}: is a folder; give a file name such as {path / 'annotated.mp4'}")
    if path.suffix.lower() not in VIDEO_CODECS:
        raise StfpmError(f"--save-video {path}: unknown video type {path.suffix!r}; use one of {', '.join(VIDEO_CODECS)}")


class VideoOutput(Output):
    """The annotated stream as a video file; a video has one frame size: the first frame's."""

    def __init__(self, path: Path, fps: float = 25.0):
        check_video_path(path)
        self.path, self.fps = path, fps
        self._writer = None
        self._size: tuple[int, int] | None = None
        self.frames = 0
        self.problem: str | None = None  # set at close when the written file does not hold the frames (the run reports it)

    def write(self, insp, picture) -> None:
        vis = picture.image
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._size = (vis.shape[1], vis.shape[0])
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*VIDEO_CODECS[self.path.suffix.lower()]), self.fps, self._size)
            if not self._writer.isOpened():
                raise OSError(f"cannot open {self.path} for writing a video")
        self._writer.write(vis if (vis.shape[1], vis.shape[0]) == self._size else cv2.resize(vis, self._size))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            self.problem = self.check()

    def check(self) -> str | None:
        """OpenCV's writer fails silently (a full disk): reopen the file and see that it decodes and holds the frames."""
        size = self.path.stat().st_size if self.path.is_file() else 0
        cap = cv2.VideoCapture(str(self.path))
        try:
            decodes = cap.isOpened() and cap.read()[0]
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if decodes else 0
        finally:
            cap.release()
        if not decodes:
            return f"{self.path} does not decode ({size} bytes for {self.frames} frames written; a full disk?)"
        if 0 < count < self.frames:
            return f"{self.path} holds {count} of the {self.frames} frames written (a full disk?)"
        return None


class AnomalyFiles(Output):
    """For each anomalous frame: the annotated frame (JPEG) and its heat map (PNG) in ``folder``.

    At most ``keep`` frames are kept: the oldest pair is deleted when a new one would exceed it,
    so a long run cannot fill the disk with pictures (the JSONL keeps every verdict).
    """

    def __init__(self, folder: Path, keep: int = 1000):
        from collections import deque

        self.folder, self.keep = folder, keep
        self._written: deque = deque()
        self.rotated = 0

    def write(self, insp, picture) -> None:
        if insp.result.verdict != ANOMALOUS:
            return
        stem = anomaly_stem(insp)
        atomic_write_bytes(self.folder / f"{stem}_overlay.jpg", cv2.imencode(".jpg", picture.image)[1].tobytes())
        heat = cv2.applyColorMap((normalized_score(picture.source_map, picture.threshold) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        atomic_write_bytes(self.folder / f"{stem}_heatmap.png", cv2.imencode(".png", heat)[1].tobytes())
        self._written.append(stem)
        while len(self._written) > self.keep:
            old = self._written.popleft()
            for suffix in ("_overlay.jpg", "_heatmap.png"):
                (self.folder / f"{old}{suffix}").unlink(missing_ok=True)
            self.rotated += 1


class Window(Output):
    """A live window (``q`` sets ``stop``)."""

    def __init__(self, stop):
        self.stop = stop

    def write(self, insp, picture) -> None:
        cv2.imshow("stfpm-edge", picture.image)
        if (cv2.waitKey(1) & 0xFF) == ord("q"):
            self.stop.set()

    def close(self) -> None:
        cv2.destroyAllWindows()


def frame_record(insp: Inspection) -> dict[str, Any]:
    """The JSONL record of one frame (inspected or failed)."""
    from ..fileio import mask_secrets

    f = insp.frame
    record: dict[str, Any] = {"frame": f.index, "source_ts": f.timestamp, "name": f.name}
    if insp.source_name is not None:
        record["source"] = insp.source_name
    if insp.result is None:
        record.update({"status": "failed", "error": mask_secrets(f.error or "undecodable frame")})
        return record
    r = insp.result
    if r.recipe is not None:
        record["recipe"] = r.recipe
    record.update({"status": "inspected", "score": r.score, "normalized_score": r.normalized_score, "verdict": r.verdict,
                   "latency_ms": {k: round(v, 3) for k, v in insp.latency_ms.items()}})
    if r.regions is not None:  # above the threshold: where, how large, how strong (a frame kept good by --min-defect-area too)
        record["regions"] = r.regions
    return record
