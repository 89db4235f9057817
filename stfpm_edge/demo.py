"""``stfpm-edge demo``: the whole job on generated data, with nothing but the install.

Builds a procedural textured-surface data set with planted defects, trains briefly, exports and
verifies the ONNX graph, runs the camera loop over a generated video and the line-scan mode over a
generated web, and writes a short report. The data is synthetic: the figures say the pipeline
works, not how well a real part would be inspected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .fileio import atomic_write_text
from .synthetic import add_defect, make_mvtec_like, texture


def make_video(path: Path, n_frames: int, size: tuple[int, int], every: int, seed: int, fourcc: str | None = None) -> list[int]:
    """A video of surface patches; every ``every``-th frame carries a defect. Returns those indices.

    ``.mkv`` / ``.avi`` are written losslessly (FFV1), as a machine-vision camera delivers frames;
    other suffixes with MPEG-4 (lossy: its artefacts on a fine texture are what docs/results/record.md "Hard parts"
    measures against the memory reference); ``fourcc`` names another codec.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    fourcc = fourcc or ("FFV1" if Path(path).suffix.lower() in (".mkv", ".avi") else "mp4v")
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25, (w, h))
    if not vw.isOpened():
        raise OSError(f"{path}: OpenCV cannot write {fourcc} video here")
    bad = []
    for i in range(n_frames):
        img = texture(rng, h, w)
        if i % every == every - 1:
            img, _, _ = add_defect(img, rng)
            bad.append(i)
        vw.write(img)
    vw.release()
    return bad


def make_web(rows: int, width: int, defect_rows: list[int], seed: int) -> np.ndarray:
    """A long web with a hole of radius 10 px centred on each given row."""
    rng = np.random.default_rng(seed)
    web = texture(rng, rows, width)
    for r in defect_rows:
        c = int(rng.integers(20, width - 20))
        cv2.circle(web, (c, r), 10, (20, 20, 20), -1)
    return web


def run_demo(out: Path, epochs: int = 40, size: int = 128, n_frames: int = 300, web_rows: int = 3200, seed: int = 0,
             reference: str | None = None) -> dict[str, Any]:
    from .config import load_config
    from .engines import open_engine
    from .errors import StfpmError
    from .export.onnx_export import export_verified
    from .geometry import Geometry
    from .stream.linescan import LineScanOptions, run_linescan
    from .stream.pipeline import RunOptions, run_stream
    from .stream.sources import IterSource, open_source
    from .train import train

    out = Path(out)
    Geometry(size, size)  # a bad --size is an error before anything is generated
    if epochs < 1 or n_frames < 1 or web_rows < 2 * size:
        raise StfpmError(f"demo: --epochs and --frames must be at least 1 and --web-rows at least {2 * size} (two tiles)")
    print("stfpm-edge demo: the data below is GENERATED (procedural textures with planted defects), not real parts.")
    # images at twice the model size: the model sees them downscaled by 2, and so do the video
    # frames and the line-scan tiles (--scale 2), so all three share one pixel scale
    src = 2 * size
    data = make_mvtec_like(out / "data" / "weave", n_train=160, n_test_good=10, n_test_defect=15, height=src, width=src, seed=seed)
    print(f"[1/5] generated data set: {data}")
    cfg = load_config(None, dict(data=str(data), out=str(out / "train"), epochs=epochs, batch_size=16, height=size, width=size, overlays=6,
                                 seed=seed, reference=reference))
    run_dir, metrics = train(cfg, resume=(out / "train" / "last.pt").is_file())
    learned = (f"a memory of {sum(metrics['memory']['rows_per_level'])} good teacher features" if cfg.reference == "memory"
               else f"a student for {epochs} epochs")
    print(f"[2/5] learned {learned}: image AUROC {metrics['image_auroc']:.3f}, pixel AUROC {metrics['pixel_auroc']:.3f}")
    onnx_path = out / "model.onnx"
    _, report = export_verified(run_dir / "model.pt", onnx_path, data=data, progress=False)  # raises unless parity holds
    ok = report["parity_ok"]
    print(f"[3/5] exported {onnx_path}: parity OK (max |dmap| {report['engines']['onnxruntime']['max_abs_map_diff']:.2g})")

    video = out / "video.mkv"  # lossless, like the frames of a machine-vision camera
    bad_frames = make_video(video, n_frames, (src, src), every=10, seed=seed + 1)
    stream = run_stream(lambda: open_engine(onnx_path), open_source(str(video)), RunOptions(out / "stream", save_video=out / "stream" / "annotated.mp4"))
    flagged = set()
    import json

    for line in (out / "stream" / "frames.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("verdict") == "anomalous":
            flagged.add(r["frame"])
    hits = len(flagged & set(bad_frames))
    print(f"[4/5] video: {stream['frames_read']} frames read, {stream['frames_inspected']} inspected, {stream['frames_failed']} failed, "
          f"{stream['fps']:.1f} FPS; defects flagged in {hits}/{len(bad_frames)} defect frames, {len(flagged - set(bad_frames))} false alarms")

    tile = src  # line-scan tiles in web pixels
    stride = tile // 2
    defect_rows = [int(web_rows * 0.15), 3 * stride, 7 * stride + 1, int(web_rows * 0.55), int(web_rows * 0.8)]
    defect_rows = sorted(set(r for r in defect_rows if 10 < r < int(web_rows * 0.85)))
    web = make_web(web_rows, src * 5 // 2, defect_rows, seed + 2)
    chunks = (web[i : i + 8] for i in range(0, len(web), 8))
    ls = run_linescan(lambda: open_engine(onnx_path), IterSource(chunks, "generated line-scan web"), LineScanOptions(out / "linescan", scale=2.0, mm_per_row=0.05, strip_downsample=4))
    found = [d["row"] for d in ls["defects"]]
    matched = [r for r in defect_rows if any(abs(f - r) <= tile // 4 for f in found)]
    false_alarms = [f for f in found if not any(abs(f - r) <= tile // 4 for r in defect_rows)]
    print(f"[5/5] line-scan: {ls['rows_received']} rows, {ls['tiles_inspected']} tiles, {ls['rows_uninspected']} rows uninspected; "
          f"planted {len(defect_rows)} defects, found {len(matched)}, false alarms {len(false_alarms)}")

    summary = {"metrics": metrics, "parity_ok": ok, "stream": stream, "bad_frames": bad_frames, "flagged": sorted(flagged),
               "linescan": ls, "planted_rows": defect_rows, "found_rows": found, "false_alarm_rows": false_alarms}
    md = f"""# stfpm-edge demo report

**The data is generated** (procedural woven texture, planted scratches, stains and holes). These
figures show that the pipeline works end to end; they are not accuracy on real parts.

| step | result |
|---|---|
| training ({learned}, {size}x{size}) | image AUROC {metrics['image_auroc']:.3f}, pixel AUROC {metrics['pixel_auroc']:.3f}, AUPRO {metrics['aupro']:.3f}, threshold {metrics['threshold']:.4g} |
| ONNX export | parity {'OK' if ok else 'FAILED'}, max abs map difference {report['engines']['onnxruntime']['max_abs_map_diff']:.2g} |
| video ({stream['frames_read']} frames) | inspected {stream['frames_inspected']}, failed {stream['frames_failed']}, dropped {stream['frames_dropped']}, {stream['fps']:.1f} FPS; defect frames flagged {hits}/{len(bad_frames)}, false alarms {len(flagged - set(bad_frames))} |
| line-scan ({ls['rows_received']} rows x {ls['web_width']} px) | tiles {ls['tiles_inspected']}, rows uninspected {ls['rows_uninspected']}; planted rows {defect_rows}, found rows {found} |

Files: `train/` (model.pt, metrics.json, roc.png, overlays/), `model.onnx`, `stream/annotated.mp4`,
`stream/frames.jsonl`, `stream/anomalies/`, `linescan/heat_strip.png`, `linescan/tiles.jsonl`.
"""
    atomic_write_text(out / "report.md", md)
    print(f"report: {out / 'report.md'}\nannotated video: {out / 'stream' / 'annotated.mp4'}\nheat strip: {out / 'linescan' / 'heat_strip.png'}")
    return summary
