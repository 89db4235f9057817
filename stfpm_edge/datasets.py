"""Data sets (training side): MVTec AD and folder layouts, the seeded splits of good images, loading
images and masks at model size. Decoding and geometry come from ``geometry`` (the run side's contract).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import DataError
from .geometry import IMAGE_SUFFIXES, Geometry, decode_image, decode_mask


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 = good, 1 = anomalous
    defect: str = "good"
    mask_path: Path | None = None


@dataclass
class Dataset:
    name: str
    layout: str  # "mvtec" or "folder"
    root: Path
    train: list[Sample]
    test: list[Sample] = field(default_factory=list)


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files


def discover(root: str | Path, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Find the images of a data set.

    MVTec AD layout: ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``.
    Folder layout: ``good/`` (normal images) and optionally one folder per defect type with masks in
    ``masks/<defect>/<name>[_mask].<ext>``; then ``test_fraction`` of the good images (seeded) are
    held out as test normals.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    if (root / "train" / "good").is_dir():
        return _discover_mvtec(root)
    if (root / "good").is_dir():
        return _discover_folder(root, seed, test_fraction)
    raise DataError(
        f"{root}: not a data set. Expected the MVTec AD layout (train/good, test/<defect>, "
        "ground_truth/<defect>) or a folder layout (good/ plus optional <defect>/ folders and masks/)."
    )


def _find_mask(mask_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = mask_dir / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _discover_mvtec(root: Path) -> Dataset:
    train = [Sample(p, 0) for p in list_images(root / "train" / "good")]
    if not train:
        raise DataError(f"{root / 'train' / 'good'}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()):
            defect = defect_dir.name
            for p in list_images(defect_dir):
                if defect == "good":
                    test.append(Sample(p, 0))
                else:
                    test.append(Sample(p, 1, defect, _find_mask(root / "ground_truth" / defect, p.stem)))
    return Dataset(root.name, "mvtec", root, train, test)


def _discover_folder(root: Path, seed: int, test_fraction: float) -> Dataset:
    good = list_images(root / "good")
    if not good:
        raise DataError(f"{root / 'good'}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    skip = {"good", "masks", "ground_truth"}
    defects: list[Sample] = []
    for defect_dir in sorted(d for d in root.iterdir() if d.is_dir() and d.name not in skip):
        for p in list_images(defect_dir):
            mask = _find_mask(root / "masks" / defect_dir.name, p.stem) or _find_mask(root / "masks", p.stem)
            defects.append(Sample(p, 1, defect_dir.name, mask))
    if not defects:
        return Dataset(root.name, "folder", root, [Sample(p, 0) for p in good], [])
    order = list(range(len(good)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(good) * test_fraction))
    test_idx = set(order[:n_test])
    train = [Sample(p, 0) for i, p in enumerate(good) if i not in test_idx]
    test = [Sample(p, 0) for i, p in enumerate(good) if i in test_idx] + defects
    if not train:
        raise DataError(f"{root / 'good'}: too few good images to hold some out for testing")
    return Dataset(root.name, "folder", root, train, test)


def split_train_val(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of the good training images into train and held-out validation."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    if len(samples) < 2:
        raise DataError("need at least two good training images (one to train, one to validate)")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(samples) - 1, max(1, round(len(samples) * val_fraction)))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [samples[i] for i in train], [samples[i] for i in val]


def heldout_splits(good: Sequence[Sample], val_fraction: float, calib_fraction: float, seed: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """The seeded split of the good training images: (train, validation, calibration).

    Validation selects the checkpoint (lowest loss). With ``calib_fraction`` > 0 a separate
    calibration split sets the threshold, so the threshold comes from images that neither trained
    nor selected the model; otherwise calibration is empty and validation also sets the threshold.
    """
    train, val = split_train_val(good, val_fraction, seed)
    calib: list[Sample] = []
    if calib_fraction > 0:
        train, calib = split_train_val(train, calib_fraction / (1.0 - val_fraction), seed + 1)
    return train, val, calib


def evenly_spaced(items: Sequence, n: int | None) -> list:
    """At most ``n`` items spread evenly over the sequence (so every defect type is represented)."""
    items = list(items)
    if n is None or len(items) <= n:
        return items
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def fitted_images(items: Sequence, geometry: Geometry, progress: bool = False, desc: str = "images") -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """Decode and fit samples (or image paths) one by one: (BGR uint8 at model size, source (h, w))."""
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc=f"loading {desc}", unit="img", leave=False)
    for item in it:
        img = decode_image(getattr(item, "path", item))
        yield geometry.fit_image(img)[0], img.shape[:2]


def load_images(samples: Iterable[Sample], geometry: Geometry, progress: bool = False, desc: str = "images"):
    """Decode and fit every sample: (uint8 [N,H,W,3] BGR at model size, list of source (h, w))."""
    samples = list(samples)
    out = np.empty((len(samples), geometry.height, geometry.width, 3), dtype=np.uint8)
    sizes: list[tuple[int, int]] = []
    for i, (fitted, size) in enumerate(fitted_images(samples, geometry, progress, desc)):
        out[i] = fitted
        sizes.append(size)
    return out, sizes


def load_masks(samples: Sequence[Sample], sizes: Sequence[tuple[int, int]], geometry: Geometry):
    """Ground truth at model size: uint8 [N,H,W] and a per-image flag of whether pixel labels exist.

    Good images have an all-zero mask. A defect image without a mask file has no pixel labels and
    is left out of the pixel metrics. A mask whose size differs from its image is an error.
    """
    masks = np.zeros((len(samples), geometry.height, geometry.width), dtype=np.uint8)
    has = np.zeros(len(samples), dtype=bool)
    for i, (s, size) in enumerate(zip(samples, sizes)):
        if s.label == 0:
            has[i] = True
            continue
        if s.mask_path is None:
            continue
        masks[i] = geometry.fit_mask(_mask_of_size(s, size))
        has[i] = True
    return masks, has


def _mask_of_size(s: Sample, size: Sequence[int]) -> np.ndarray:
    """The sample's mask, which must have the size of its image."""
    m = decode_mask(s.mask_path)
    if m.shape[:2] != tuple(size):
        raise DataError(
            f"{s.mask_path}: mask is {m.shape[1]}x{m.shape[0]} but its image {s.path} is "
            f"{size[1]}x{size[0]}; masks must have the size of their image"
        )
    return m


def check_test_set(samples: Sequence[Sample], progress: bool = False) -> None:
    """Decode every test image and mask once, so a corrupt file or a mask of the wrong size is an
    error before training starts (not after it). Nothing is kept."""
    it = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc="checking test images", unit="img", leave=False)
    for s in it:
        size = decode_image(s.path).shape[:2]
        if s.mask_path is not None:
            _mask_of_size(s, size)


def content_mask(geometry: Geometry, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool [N,H,W]: True where model input holds image content (all True for ``squash``)."""
    out = np.zeros((len(sizes), geometry.height, geometry.width), dtype=bool)
    for i, (h, w) in enumerate(sizes):
        b = geometry.content_box(h, w)
        out[i, b.y0 : b.y1, b.x0 : b.x1] = True
    return out
