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

from ..fileio import atomic_write_bytes
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
                if owner is not None and _alive(owner):
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JsonlWriter:
    """One JSON object per line, flushed as written: a crash leaves whole lines only."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


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


class Output:
    def write(self, insp: Inspection, picture: Picture) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class VideoOutput(Output):
    """The annotated stream as an .mp4; a video has one frame size: the first frame's."""

    def __init__(self, path: Path, fps: float = 25.0):
        self.path, self.fps = path, fps
        self._writer = None
        self._size: tuple[int, int] | None = None

    def write(self, insp, picture) -> None:
        vis = picture.image
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._size = (vis.shape[1], vis.shape[0])
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self._size)
        self._writer.write(vis if (vis.shape[1], vis.shape[0]) == self._size else cv2.resize(vis, self._size))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


class AnomalyFiles(Output):
    """For each anomalous frame: the annotated frame (JPEG) and its heat map (PNG) in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def write(self, insp, picture) -> None:
        if insp.result.verdict != ANOMALOUS:
            return
        stem = f"{insp.frame.index:06d}"
        atomic_write_bytes(self.folder / f"{stem}_overlay.jpg", cv2.imencode(".jpg", picture.image)[1].tobytes())
        heat = cv2.applyColorMap((normalized_score(picture.source_map, picture.threshold) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        atomic_write_bytes(self.folder / f"{stem}_heatmap.png", cv2.imencode(".png", heat)[1].tobytes())


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
    if insp.result is None:
        record.update({"status": "failed", "error": mask_secrets(f.error or "undecodable frame")})
        return record
    r = insp.result
    record.update({"status": "inspected", "score": r.score, "normalized_score": r.normalized_score, "verdict": r.verdict,
                   "latency_ms": {k: round(v, 3) for k, v in insp.latency_ms.items()}})
    return record
