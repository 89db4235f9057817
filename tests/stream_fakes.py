"""Stand-ins for the stream tests: an engine with a known map, generated frames and videos, a flaky camera."""

import json
import time

import cv2
import numpy as np

from stfpm_edge.geometry import Geometry
from stfpm_edge.stream.sources import Source


class DarkSpotEngine:
    """A stand-in engine with a known map: 1 where a pixel is dark, else 0 (threshold 0.5)."""

    name = "fake"

    def __init__(self, size=(32, 32), delay=0.0):
        self.geometry = Geometry(*size)
        self.threshold = 0.5
        self.meta = {}
        self.delay = delay
        self.calls = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def infer(self, frames):
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        maps = (frames.mean(axis=3) < 40).astype(np.float32)
        return maps, maps.reshape(len(maps), -1).max(axis=1)


def _frames(n, bad=(), size=(48, 64)):
    for i in range(n):
        img = np.full(size + (3,), 180, np.uint8)
        if i in bad:
            img[10:20, 10:20] = 0
        yield img


def _write_video(path, n, bad=(), size=(48, 64)):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (size[1], size[0]))
    for img in _frames(n, bad, size):
        vw.write(img)
    vw.release()


def _records(out):
    return [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]


class FlakyCamera(Source):
    """A live source that loses its connection once after 10 frames."""

    live = True
    kind = "camera"

    def __init__(self):
        super().__init__("flaky")
        self.connected, self.dropped_once, self.n = True, False, 0

    def read(self):
        from stfpm_edge.stream.sources import Frame

        if not self.connected:
            return None
        if self.n == 10 and not self.dropped_once:
            self.dropped_once, self.connected = True, False
            return None
        if self.n >= 20:
            return None
        self.n += 1
        time.sleep(0.01)
        return Frame(self.n - 1, next(_frames(1)), time.time())

    def reopen(self):
        self.connected = True
        return True
