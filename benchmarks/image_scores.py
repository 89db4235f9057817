"""Which summary of the map makes the best image score? Summaries compared on trained models, at the verdict a line sees.

    python benchmarks/image_scores.py runs/bottle-s0 runs/screw-s0 runs/transistor-s0 [--generated] --markdown

For each run folder (a memory model), the model's maps of its held-out good images (the calibration and
validation splits it was trained with: images it did not learn) and of the test images are summarised by

- ``max``: the map's largest value (the tool's default, after its smoothing);
- ``top 0.1 %`` / ``top 1 %``: the mean of that share of the largest values;
- ``region mass`` / ``region area``: the largest connected region above a pixel threshold set on the good
  images (their maps' 99.9th percentile), by the sum of its excess over that threshold, or its area;
- ``max x region area``: the two together (a strong peak that also covers ground).

Each summary's threshold is set from the held-out good images alone, for a 1 % false-call rate (the tool's
rule: ``thresholds.fit_threshold``); printed: image AUROC, defective test images passed at that threshold,
and test good images rejected. The whole-part term is left out (it is added to any summary alike).
``--generated`` adds a generated class with small defects (``synthetic.make_mvtec_like``, 96x128 px, defects
a few pixels across), trained here with the defaults at 128 x 128.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def summaries(maps: np.ndarray, pixel_threshold: float) -> dict[str, np.ndarray]:
    import cv2

    n = len(maps)
    flat = maps.reshape(n, -1)
    srt = np.sort(flat, axis=1)[:, ::-1]
    k01, k1 = max(1, round(0.001 * flat.shape[1])), max(1, round(0.01 * flat.shape[1]))
    mass, area = np.zeros(n), np.zeros(n)
    for i, m in enumerate(maps):
        above = (m > pixel_threshold).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
        if count > 1:
            excess = np.where(above > 0, m - pixel_threshold, 0.0)
            sums = np.bincount(labels.ravel(), weights=excess.ravel(), minlength=count)[1:]
            mass[i] = sums.max()
            area[i] = stats[1:, cv2.CC_STAT_AREA].max()
    return {"max": srt[:, 0], "top 0.1 %": srt[:, :k01].mean(1), "top 1 %": srt[:, :k1].mean(1), "region mass": mass,
            "region area": area, "max x region area": srt[:, 0] * (1.0 + area)}


def evaluate_run(run: Path) -> tuple[str, dict]:
    from sklearn.metrics import roc_auc_score

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.config import TrainConfig
    from stfpm_edge.datasets import discover, heldout_splits, load_images
    from stfpm_edge.engines.torch_engine import TorchEngine
    from stfpm_edge.evaluate import predict
    from stfpm_edge.geometry import Geometry
    from stfpm_edge.thresholds import fit_threshold

    model, meta = load_checkpoint(run / "model.pt")
    if getattr(model.student, "whole", None) is not None:
        model.student.whole = None
    cfg = TrainConfig(**{k: v for k, v in meta["config"].items() if k in TrainConfig.__dataclass_fields__})
    geo = Geometry(**meta["geometry"])
    ds = discover(meta["dataset"]["root"], seed=cfg.seed)
    _, val_s, calib_s = heldout_splits(ds.train, cfg.val_fraction, cfg.calib_fraction, cfg.seed)
    infer = TorchEngine.from_model(model, meta).infer
    good_imgs, _ = load_images([*calib_s, *val_s], geo)
    test_imgs, _ = load_images(ds.test, geo)
    good_maps, _ = predict(infer, good_imgs)
    test_maps, _ = predict(infer, test_imgs)
    good_maps, test_maps = good_maps.reshape(len(good_maps), *good_maps.shape[-2:]), test_maps.reshape(len(test_maps), *test_maps.shape[-2:])
    tau = float(np.quantile(good_maps, 0.999))
    labels = np.array([s.label for s in ds.test])
    g, t = summaries(good_maps, tau), summaries(test_maps, tau)
    out = {}
    for name in g:
        thr = fit_threshold(g[name], 0.01, "tail", cfg.seed)["image"]
        out[name] = {"auroc": roc_auc_score(labels, t[name]), "missed": int((t[name][labels == 1] <= thr).sum()), "defective": int(labels.sum()),
                     "flagged": int((t[name][labels == 0] > thr).sum()), "good": int((labels == 0).sum()), "n_good_ref": len(good_imgs)}
    return ds.name, out


def generated_run(tmp: Path) -> Path:
    """A woven surface (``synthetic.texture``, 96 x 128 px) whose defects are small: a dark or bright spot of radius 2 to 4 px."""
    import cv2

    from stfpm_edge.config import load_config
    from stfpm_edge.synthetic import texture
    from stfpm_edge.train import train

    rng = np.random.default_rng(3)
    data = tmp / "generated-small"
    for sub, n in (("train/good", 160), ("test/good", 40), ("test/spot", 40)):
        (data / sub).mkdir(parents=True)
        for i in range(n):
            img = texture(rng, 96, 128)
            if sub == "test/spot":
                centre = (int(rng.integers(10, 118)), int(rng.integers(10, 86)))
                shade = int(rng.choice([40, 230]))
                cv2.circle(img, centre, int(rng.integers(2, 5)), (shade, shade, shade), -1)
            cv2.imwrite(str(data / sub / f"{i:03d}.png"), img)
    run_dir, _ = train(load_config(None, dict(data=str(data), out=str(tmp / "run"), height=128, width=128, overlays=0, seed=0)), progress=False)
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="*")
    ap.add_argument("--generated", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    results = [evaluate_run(r) for r in args.runs]
    with tempfile.TemporaryDirectory() as tmp:
        if args.generated:
            results.append(evaluate_run(generated_run(Path(tmp))))
    names = list(results[0][1])
    print("| image score | " + " | ".join(f"{c}: AUROC · missed · good rejected" for c, _ in results) + " |")
    print("|---|" + "---|" * len(results))
    for name in names:
        cells = [f"{r[name]['auroc']:.4f} · {r[name]['missed']} of {r[name]['defective']} · {r[name]['flagged']} of {r[name]['good']}" for _, r in results]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"(thresholds from {', '.join(str(r[names[0]]['n_good_ref']) for _, r in results)} held-out good images, 1 % false calls, tail rule)")


if __name__ == "__main__":
    main()
