"""Which whole-part term? Variants of a global / coarse-grid term added to trained memory models' image scores, compared.

    python benchmarks/whole_part.py runs/bottle-s0 runs/bottle-s1 ... runs/transistor-s2 --markdown

Each run folder is a memory model trained with the whole-part term off (``whole_weight: 0`` in a
--config file) or on (its term is taken out first): its map score stays as it is. For each
variant, every image of the data set (train/good, test/) is described by one teacher level averaged
over a g x g grid (``model.WholePart.describe`` with ``GRID`` = g), its distance taken to the
nearest train/good image (the train images: to the nearest other one), and the image score becomes

    map score / median(good out-of-fold map scores) + w * relu((d - quantile(d_train, off)) / (p99(d_train) - median(d_train)))

(``off`` = None: the plain sum with the distance standardised that way, no gate). Printed: image
AUROC per category (mean and range over the runs given) for each variant; the first row is the map
score alone. Everything a variant uses comes from good images; the test images only score it.

``--cells``: the map-level form instead (the tool's since it won here): each cell of a g x g grid of the deepest
level against the same cell of every train/good image (the train images: the others), ``w * median(good scores)
* relu((d - quantile(d_train, off)) / spread)`` per cell, laid over the map bilinearly and added to it; printed:
pixel AUROC and the image AUROC of the new map's top-1 % mean.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--cells", action="store_true", help="the map-level (per-cell) variants")
    args = ap.parse_args()
    if args.cells:
        return cells_study(args.runs)

    import torch
    from sklearn.metrics import roc_auc_score

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.datasets import discover, load_images
    from stfpm_edge.geometry import Geometry
    from stfpm_edge.model import WholePart

    variants = [("map score alone", None, None, None, None)]
    variants += [(f"L{lev} g{g}, sum, w 1", lev, g, None, 1.0) for lev, g in ((2, 1), (2, 4))]
    variants += [(f"L{lev} g{g}, gate {off}, w {w:g}", lev, g, off, w) for lev in (1, 2) for g in (1, 4) for off in (0.75, 0.9, 0.95) for w in (0.5, 1.0)]
    table: dict = defaultdict(lambda: defaultdict(list))
    for run in args.runs:
        model, meta = load_checkpoint(run / "model.pt")
        if getattr(model.student, "whole", None) is not None:
            model.student.whole = None  # the map score alone
        geo = Geometry(**meta["geometry"])
        ds = discover(meta["dataset"]["root"])
        category = ds.name
        train_imgs, _ = load_images(ds.train, geo)
        test_imgs, _ = load_images(ds.test, geo)
        labels = np.array([s.label for s in ds.test])
        good = np.asarray(meta["normal_stats"]["heldout_scores"], dtype=np.float64)

        def passes(imgs):
            feats, scores = [], []
            with torch.inference_mode():
                for i in range(0, len(imgs), 8):
                    frames = torch.from_numpy(imgs[i : i + 8])
                    feats.append([f.float() for f in model.teacher(model.normalize(frames))])
                    scores.append(model(frames)[1].numpy())
            return [torch.cat([f[k] for f in feats]) for k in range(len(feats[0]))], np.concatenate(scores)

        tr_f, _ = passes(train_imgs)
        te_f, te_s = passes(test_imgs)
        for name, lev, g, off, w in variants:
            if lev is None:
                table[name][category].append(roc_auc_score(labels, te_s))
                continue
            WholePart.GRID = g
            a, b = WholePart.describe(tr_f[lev]), WholePart.describe(te_f[lev])
            d_te = (1 - (b @ a.T).amax(1)).numpy()
            sim = a @ a.T
            sim.fill_diagonal_(-1)
            d_tr = (1 - sim.amax(1)).numpy()
            spread = np.quantile(d_tr, 0.99) - np.median(d_tr)
            base = te_s / np.median(good)
            if off is None:
                s = base + w * (d_te - np.median(d_tr)) / spread
            else:
                s = base + w * np.maximum(0, (d_te - np.quantile(d_tr, off)) / spread)
            table[name][category].append(roc_auc_score(labels, s))
        WholePart.GRID = 4
    categories = sorted({c for v in table.values() for c in v})
    if args.markdown:
        print("| variant | " + " | ".join(f"{c} image AUROC (mean, range)" for c in categories) + " |")
        print("|---|" + "---|" * len(categories))
    for name, _, _, _, _ in variants:
        cells = [f"{np.mean(v):.4f} ({min(v):.4f}-{max(v):.4f})" for v in (table[name][c] for c in categories)]
        print(f"| {name} | " + " | ".join(cells) + " |" if args.markdown else f"{name:28s} " + "  ".join(f"{c} {x}" for c, x in zip(categories, cells)))


def cells_study(runs) -> None:
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from stfpm_edge.checkpoint import load_checkpoint
    from stfpm_edge.datasets import discover, load_images, load_masks
    from stfpm_edge.geometry import Geometry

    variants = [(g, off, w) for g in (4, 8) for off in (0.9, 0.99, 0.999, 1.0) for w in (0.25, 0.5, 1.0)]
    table: dict = defaultdict(lambda: defaultdict(list))
    for run in runs:
        model, meta = load_checkpoint(run / "model.pt")
        model.student.whole = None
        geo = Geometry(**meta["geometry"])
        ds = discover(meta["dataset"]["root"])
        train_imgs, _ = load_images(ds.train, geo)
        test_imgs, sizes = load_images(ds.test, geo)
        masks, has = load_masks(ds.test, sizes, geo)
        labels = np.array([s.label for s in ds.test])
        scale = float(np.median(meta["normal_stats"]["heldout_scores"]))

        def passes(imgs):
            feats, maps = [], []
            with torch.inference_mode():
                for i in range(0, len(imgs), 8):
                    frames = torch.from_numpy(imgs[i : i + 8])
                    feats.append(model.teacher(model.normalize(frames))[-1].float())
                    maps.append(model(frames)[0][:, 0].numpy())
            return torch.cat(feats), np.concatenate(maps)

        tr_f, _ = passes(train_imgs)
        te_f, te_m = passes(test_imgs)
        truth = masks[has].ravel() > 0
        table[("map alone", None, None)][ds.name].append((roc_auc_score(truth, te_m[has].ravel()), _top1_auroc(te_m, labels)))
        for g in (4, 8):
            ctr, cte = F.normalize(F.adaptive_avg_pool2d(tr_f, g), dim=1), F.normalize(F.adaptive_avg_pool2d(te_f, g), dim=1)
            sim_tr = torch.einsum("ncij,mcij->nmij", ctr, ctr)
            idx = torch.arange(len(ctr))
            sim_tr[idx, idx] = -1.0
            d_tr = (1 - sim_tr.amax(1)).numpy()
            d_te = (1 - torch.einsum("ncij,mcij->nmij", cte, ctr).amax(1)).numpy()
            spread = np.quantile(d_tr, 0.99) - np.median(d_tr)
            for gg, off, w in variants:
                if gg != g:
                    continue
                ex = w * scale * np.maximum(0, (d_te - np.quantile(d_tr, off)) / spread)
                up = F.interpolate(torch.from_numpy(ex)[:, None].float(), size=te_m.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()
                m2 = te_m + up
                table[(f"{g} x {g} cells", off, w)][ds.name].append((roc_auc_score(truth, m2[has].ravel()), _top1_auroc(m2, labels)))
    categories = sorted({c for v in table.values() for c in v})
    print("| variant | gate | weight | " + " | ".join(f"{c} pixel / image AUROC" for c in categories) + " |")
    print("|---|---|---|" + "---|" * len(categories))
    for (name, off, w), per in table.items():
        cells = [" / ".join(f"{np.mean([v[k] for v in per[c]]):.4f}" for k in (0, 1)) for c in categories]
        print(f"| {name} | {off if off is not None else '-'} | {w if w is not None else '-'} | " + " | ".join(cells) + " |")


def _top1_auroc(maps: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    flat = maps.reshape(len(maps), -1)
    k = max(1, round(0.01 * flat.shape[1]))
    return roc_auc_score(labels, np.sort(flat, axis=1)[:, -k:].mean(1))


if __name__ == "__main__":
    main()
