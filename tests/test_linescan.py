"""Line-scan: tiling that covers every row, detections at their web rows, merging across tiles."""


import numpy as np
import pytest

from stfpm_edge.stream.linescan import (
    LineScanOptions,
    Tiler,
    merge_detections,
    run_linescan,
    tile_starts,
)
from stfpm_edge.stream.sources import IterSource
from tests.stream_fakes import DarkSpotEngine


def test_tile_starts_cover_everything():
    assert tile_starts(100, 100, 50) == [0]
    assert tile_starts(250, 100, 50) == [0, 50, 100, 150]
    assert tile_starts(260, 100, 50) == [0, 50, 100, 150, 160]


def test_tiler_handles_arbitrary_chunks():
    tiler = Tiler(32, 32, 0.5)
    web = np.zeros((150, 80, 3), np.uint8)
    tiles = []
    for start in range(0, 150, 7):
        tiles += tiler.push(web[start : start + 7])
    tiles += tiler.finish()
    rows = {y for y, _, _ in tiles}
    assert sorted(rows) == [0, 16, 32, 48, 64, 80, 96, 112, 118]
    assert {x for _, x, _ in tiles} == {0, 16, 32, 48}
    assert all(t.shape == (32, 32, 3) for _, _, t in tiles)


def test_line_scan_finds_planted_defects_at_their_rows(tmp_path):
    rng = np.random.default_rng(0)
    web = np.full((1000, 100, 3), 180, np.uint8)
    planted = [(100, 20), (255, 70), (511, 50), (800, 10)]  # row 255 straddles a 32-row tile boundary (stride 16)
    for r, c in planted:
        web[r - 3 : r + 3, c - 3 : c + 3] = 0

    def chunks():
        i = 0
        while i < len(web):
            k = int(rng.integers(1, 9))
            yield web[i : i + k]
            i += k

    summary = run_linescan(lambda: DarkSpotEngine((32, 32)), IterSource(chunks()), LineScanOptions(tmp_path / "ls", mm_per_row=0.1, strip_downsample=2))
    assert summary["rows_received"] == 1000 and summary["rows_uninspected"] == 0
    found = [(d["row"], d["col"]) for d in summary["defects"]]
    assert len(found) == len(planted)
    for (r, c), (fr, fc) in zip(planted, found):
        assert abs(fr - r) <= 4 and abs(fc - c) <= 4
    assert summary["defects"][0]["position_mm"] == pytest.approx(summary["defects"][0]["row"] * 0.1)
    assert (tmp_path / "ls" / "heat_strip.png").stat().st_size > 0


def test_merge_detections_keeps_one_per_defect():
    dets = [{"row": 100, "col": 10, "score": 1.0}, {"row": 105, "col": 12, "score": 2.0}, {"row": 300, "col": 10, "score": 1.5}]
    merged = merge_detections(dets, 16, 16)
    assert [(d["row"], d["score"]) for d in merged] == [(105, 2.0), (300, 1.5)]


def _run_bounded(fn, seconds=30):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    import threading

    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "line-scan did not end: deadlock"
    return box


def test_rows_of_another_width_are_failed_not_fatal(tmp_path):
    blocks = [np.full((40, 100, 3), 180, np.uint8) for _ in range(20)]
    blocks[7] = np.full((40, 120, 3), 180, np.uint8)
    box = _run_bounded(lambda: run_linescan(lambda: DarkSpotEngine((32, 32)), IterSource(iter(blocks)), LineScanOptions(tmp_path / "w")))
    s = box["value"]
    assert s["chunks_read"] == 20 and s["chunks_failed"] == 1 and s["rows_received"] == 19 * 40 and s["rows_uninspected"] == 0


def test_an_error_inside_the_loop_ends_promptly_with_a_summary(tmp_path):
    import json

    class Failing(DarkSpotEngine):
        def infer(self, frames):
            if self.calls >= 3:
                raise RuntimeError("engine fell over")
            return super().infer(frames)

    blocks = (np.full((16, 64, 3), 180, np.uint8) for _ in range(2000))  # far more than the hand-over holds
    box = _run_bounded(lambda: run_linescan(lambda: Failing((32, 32)), IterSource(blocks), LineScanOptions(tmp_path / "f")))
    assert "engine fell over" in str(box.get("error"))
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert "engine fell over" in summary["error"] and summary["tiles_inspected"] == 3
    lines = (tmp_path / "f" / "tiles.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
