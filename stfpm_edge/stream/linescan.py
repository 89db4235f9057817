"""Line-scan inspection: rows of a moving web arrive a few at a time; overlapping tiles are inspected.

Rows go into a rolling buffer. Tiles of ``scale`` x model size (source pixels) are cut with
``overlap`` (a fraction of the tile) between neighbours, down the web and across it, so every row
is inspected at least once and a defect smaller than the overlap that straddles a tile boundary
lies whole inside a neighbouring tile. The tail of the web gets a last tile aligned to its end.
Detections are placed on the web (row, column; millimetres with ``mm_per_row``), merged across
overlapping tiles, and a stitched heat strip of the whole web is saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_json, mask_secrets
from ..render import heat_overlay
from ..scoring import ANOMALOUS, is_anomalous, normalized_score, verdict
from ..timing import percentiles
from .capture import END, BlockingQueue, Capture, Reconnect
from .counters import Counters
from .outputs import JsonlWriter
from .sources import Source


@dataclass
class LineScanOptions:
    out_dir: Path
    scale: float = 1.0  # source pixels per model pixel (1 = native resolution)
    overlap: float = 0.5  # fraction of a tile shared with its neighbour, down and across the web
    mm_per_row: float | None = None
    strip_downsample: int = 4  # the saved heat strip is this many times smaller than the web
    max_strip_rows: int = 100_000
    reconnect: Reconnect = field(default_factory=Reconnect)
    sinks: list = field(default_factory=list)  # stream.sinks.Sink objects (not started): one message per detecting tile


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile``; the last one is aligned to the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


class Tiler:
    """Cuts overlapping tiles from rows pushed in arbitrary chunks."""

    def __init__(self, tile_h: int, tile_w: int, overlap: float):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.tile_h, self.tile_w = tile_h, tile_w
        self.stride_y = max(1, round(tile_h * (1 - overlap)))
        self.stride_x = max(1, round(tile_w * (1 - overlap)))
        self.width: int | None = None
        self.total = 0  # rows received
        self.buf = np.zeros((0, 0, 3), np.uint8)
        self.buf_start = 0  # web row of buf[0]
        self.next_y = 0
        self.covered_to = 0  # rows [0, covered_to) are in some emitted tile

    def _cut(self, y0: int, y1: int) -> list[tuple[int, int, np.ndarray]]:
        band = self.buf[y0 - self.buf_start : y1 - self.buf_start]
        xs = tile_starts(self.width, self.tile_w, self.stride_x)
        tiles = [(y0, x, band[:, x : x + min(self.tile_w, self.width)]) for x in xs]
        self.covered_to = max(self.covered_to, y1)
        return tiles

    def push(self, rows: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        if rows.ndim == 2:
            rows = cv2.cvtColor(rows, cv2.COLOR_GRAY2BGR)
        if self.width is None:
            self.width = rows.shape[1]
            self.buf = np.zeros((0, self.width, 3), np.uint8)
        elif rows.shape[1] != self.width:
            raise ValueError(f"line width changed from {self.width} to {rows.shape[1]} pixels")
        self.buf = np.concatenate([self.buf, rows])
        self.total += len(rows)
        out = []
        while self.next_y + self.tile_h <= self.total:
            out += self._cut(self.next_y, self.next_y + self.tile_h)
            self.next_y += self.stride_y
        # rows no future tile needs; the last tile_h rows stay for the end-aligned tail tile
        drop = max(0, min(self.next_y, self.total - self.tile_h)) - self.buf_start
        if drop > 0:
            self.buf = self.buf[drop:]
            self.buf_start += drop
        return out

    def finish(self) -> list[tuple[int, int, np.ndarray]]:
        if self.total == 0 or self.covered_to >= self.total:
            return []
        return self._cut(max(0, self.total - self.tile_h), self.total)


def tile_detections(tmap: np.ndarray, threshold: float, margin: int, inner_sides: tuple[bool, bool, bool, bool]) -> list[tuple[int, int, float]]:
    """Peaks (row, col, value) of the connected regions of a tile's map above ``threshold``.

    A peak within ``margin`` pixels of a tile side that has a neighbouring tile beyond it
    (``inner_sides``: top, bottom, left, right) is left to that neighbour, which sees it away from
    its border: feature maps near an image border are less reliable, and with the overlap every
    web position lies at least ``margin`` inside some tile.
    """
    mask = is_anomalous(tmap, threshold).astype(np.uint8)
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    h, w = tmap.shape
    out = []
    for k in range(1, n):
        vals = np.where(labels == k, tmap, -np.inf)
        r, c = np.unravel_index(int(np.argmax(vals)), vals.shape)
        top, bottom, left, right = inner_sides
        if (top and r < margin) or (bottom and r >= h - margin) or (left and c < margin) or (right and c >= w - margin):
            continue
        out.append((int(r), int(c), float(tmap[r, c])))
    return out


def merge_detections(dets: list[dict], radius_rows: float, radius_cols: float) -> list[dict]:
    """One detection per defect: those closer than the radii are merged, keeping the highest score."""
    merged: list[dict] = []
    for d in sorted(dets, key=lambda d: -d["score"]):
        if not any(abs(d["row"] - m["row"]) < radius_rows and abs(d["col"] - m["col"]) < radius_cols for m in merged):
            merged.append(dict(d))
    return sorted(merged, key=lambda d: d["row"])


class HeatStrip:
    """The stitched, downsampled picture of the whole web: rows kept as they arrive, tile maps max-merged."""

    def __init__(self, downsample: int, max_rows: int):
        self.ds, self.max_rows = max(1, downsample), max_rows
        self.rows: list[np.ndarray] = []
        self.map = np.zeros((0, 0), np.float32)

    def add_rows(self, block: np.ndarray, first_row: int) -> None:
        if first_row < self.max_rows:  # keep every ds-th web row (by global row index)
            self.rows.append(block[(-first_row) % self.ds :: self.ds, :: self.ds])

    def add_tile(self, tmap: np.ndarray, y0: int, x0: int, web_width: int) -> None:
        ds = self.ds
        th, tw = tmap.shape
        sy0, sy1, sx0 = y0 // ds, (y0 + th) // ds, x0 // ds
        if sy1 > self.max_rows // ds:
            return
        width = (web_width + ds - 1) // ds
        if self.map.shape[1] != width:
            self.map = np.zeros((self.map.shape[0], width), np.float32)
        if sy1 > self.map.shape[0]:
            self.map = np.concatenate([self.map, np.zeros((sy1 - self.map.shape[0], width), np.float32)])
        small = cv2.resize(tmap, (max(1, tw // ds), max(1, sy1 - sy0)), interpolation=cv2.INTER_AREA)
        region = self.map[sy0 : sy0 + small.shape[0], sx0 : sx0 + small.shape[1]]
        np.maximum(region, small[: region.shape[0], : region.shape[1]], out=region)

    def save(self, path: Path, threshold: float, defects: list[dict], tile_w: int) -> bool:
        if not self.rows or not self.map.size:
            return False
        web = np.concatenate(self.rows)[: self.map.shape[0]]
        heat = heat_overlay(web, cv2.resize(self.map, (web.shape[1], web.shape[0])), threshold)
        for d in defects:
            cv2.circle(heat, (d["col"] // self.ds, d["row"] // self.ds), max(6, tile_w // self.ds // 4), (255, 255, 255), 2)
        atomic_write_bytes(path, cv2.imencode(".png", heat)[1].tobytes())
        return True


class WebInspection:
    """Inspects the tiles of one web with one engine; keeps coverage, detections and the heat strip."""

    def __init__(self, engine, opts: LineScanOptions, writer: JsonlWriter, counters: Counters):
        self.engine, self.opts, self.writer, self.counters = engine, opts, writer, counters
        geo = engine.geometry
        self.tile_h, self.tile_w = round(geo.height * opts.scale), round(geo.width * opts.scale)
        self.tiler = Tiler(self.tile_h, self.tile_w, opts.overlap)
        self.strip = HeatStrip(opts.strip_downsample, opts.max_strip_rows)
        self.coverage = np.zeros(0, np.int32)
        self.detections: list[dict] = []
        self.n_tiles = 0
        self.finishing = False
        # with overlap o, every web position lies at least o * tile / 4 inside some tile
        self.margin = int(min(self.tile_h, self.tile_w) * opts.overlap / 4)

    def rows(self, frame, arrival: float) -> None:
        """A block of rows arrived: cut and inspect the tiles it completes; another width is a failed block."""
        try:
            tiles = self.tiler.push(frame.image)
        except ValueError as exc:  # rows of another width: not part of this web
            self.counters.failed += 1
            self.writer.write({"event": "failed_rows", "frame": frame.index, "error": str(exc)})
            return
        self.strip.add_rows(frame.image, self.tiler.total - len(frame.image))
        self.inspect(tiles, arrival)

    def finish(self) -> None:
        self.finishing = True
        self.inspect(self.tiler.finish(), time.perf_counter())

    def inspect(self, tiles, arrival: float) -> None:
        """Inspect the tiles completed by rows that arrived at ``arrival`` (perf_counter)."""
        geo, thr, tiler = self.engine.geometry, self.engine.threshold, self.tiler
        for y0, x0, tile in tiles:
            t0 = time.perf_counter()
            fitted, _ = geo.fit_image(tile)
            maps, scores = self.engine.infer(fitted)
            t1 = time.perf_counter()
            score = float(scores[0])
            th, tw = tile.shape[:2]
            tmap = geo.unfit_map(maps[0], th, tw)
            if len(self.coverage) < y0 + th:
                self.coverage = np.concatenate([self.coverage, np.zeros(y0 + th - len(self.coverage), np.int32)])
            self.coverage[y0 : y0 + th] += 1
            self.strip.add_tile(tmap, y0, x0, tiler.width)
            record = {"tile": self.n_tiles, "row0": y0, "col0": x0, "rows": th, "cols": tw, "score": score,
                      "normalized_score": float(normalized_score(score, thr)), "verdict": verdict(score, thr),
                      "latency_ms": {"inference": round((t1 - t0) * 1e3, 3)}}
            if is_anomalous(score, thr):
                inner = (y0 > 0, y0 + th < tiler.total or not self.finishing, x0 > 0, x0 + tw < tiler.width)
                found = tile_detections(tmap, thr, self.margin, inner)
                dets = []
                for r, c, peak in found:
                    det = {"row": int(y0 + r), "col": int(x0 + c), "score": peak, "tile": self.n_tiles}
                    if self.opts.mm_per_row:
                        det["position_mm"] = det["row"] * self.opts.mm_per_row
                    dets.append(det)
                self.detections.extend(dets)
                record["peaks"] = [{"row": d["row"], "col": d["col"], "score": d["score"]} for d in dets]
                if dets:
                    message = {"event": "detection", "status": "inspected", "verdict": ANOMALOUS, "tile": self.n_tiles, "score": score, "peaks": dets}
                    for sink in self.opts.sinks:
                        if sink.wants(message):
                            sink.offer(message, arrival)
            self.writer.write(record)
            self.counters.add_latency({"inference": (t1 - t0) * 1e3})
            self.counters.inspected += 1
            self.n_tiles += 1

    def uninspected_rows(self) -> int:
        total = self.tiler.total
        return int((self.coverage[:total] == 0).sum()) + max(0, total - len(self.coverage))


def run_linescan(engine_factory: Callable[[], Any], source: Source, opts: LineScanOptions, stop=None) -> dict[str, Any]:
    """Inspect a web row block by row block until the source ends or ``stop`` is set; returns the summary."""
    import threading

    stop = stop or threading.Event()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    counters = Counters()
    slot = BlockingQueue()  # a web is never dropped: every row must be inspected
    writer = JsonlWriter(opts.out_dir / "tiles.jsonl")
    error: BaseException | None = None
    t_start = time.perf_counter()
    with engine_factory() as engine:
        web = WebInspection(engine, opts, writer, counters)
        for sink in opts.sinks:
            sink.context.setdefault("source", source.describe())
            sink.context["threshold"] = engine.threshold
            sink.start()
        cap = Capture(source, slot, counters, stop, [], opts.reconnect).start()
        try:
            while True:
                item = slot.get()
                if item is END:
                    break
                frame, arrival = item
                if frame.image is None:
                    counters.failed += 1
                    writer.write({"event": "failed_rows", "frame": frame.index, "error": frame.error})
                    continue
                web.rows(frame, arrival)
            web.finish()
        except BaseException as exc:  # end promptly, with a summary that says why
            error = exc
        finally:
            cap.stop_and_join()
            source.close()
            for sink in opts.sinks:
                sink.close()
    defects = merge_detections(web.detections, web.tile_h / 4, web.tile_w / 4)
    for d in defects:
        writer.write({"event": "defect", **d})
    writer.close()
    wall = time.perf_counter() - t_start
    summary = {
        "rows_received": web.tiler.total, "web_width": web.tiler.width, "tile": [web.tile_h, web.tile_w], "overlap": opts.overlap,
        "tiles_inspected": web.n_tiles, "rows_uninspected": web.uninspected_rows(), "chunks_read": counters.read, "chunks_failed": counters.failed,
        "defects": defects, "wall_s": wall, "rows_per_s": web.tiler.total / wall if wall > 0 else 0.0,
        "tile_latency_ms": percentiles(counters.latency["inference"]) if web.n_tiles else None,
        "source": source.describe(),
    }
    if opts.sinks:
        summary["sinks"] = [s.stats() for s in opts.sinks]
    if error is None and web.strip.save(opts.out_dir / "heat_strip.png", engine.threshold, defects, web.tile_w):
        summary["heat_strip"] = str(opts.out_dir / "heat_strip.png")
    if error is not None:
        summary["error"] = mask_secrets(f"{type(error).__name__}: {error}")
    atomic_write_json(opts.out_dir / "summary.json", summary)
    if error is not None:
        raise error
    return summary
