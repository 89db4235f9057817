"""Data: robust image decoding, the geometry that turns any image into model input, and data sets.

Torch-free on purpose: the ONNX Runtime / TensorRT run path uses the same decoding and geometry
without importing torch. Normalisation (mean/std, colour order) is *not* here: it lives inside the
model (``model.STFPM.normalize``) and therefore inside the exported graph.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
RESIZE_MODES = ("squash", "letterbox")


# --------------------------------------------------------------------------------------- decoding
def decode_image(path: str | Path) -> np.ndarray:
    """Read any supported image as 3-channel BGR uint8 (OpenCV's camera order).

    Grayscale is replicated to three channels, alpha is dropped, 16-bit and float images are
    scaled to 8 bit. A missing, empty or corrupt file raises ``DataError`` naming it.
    """
    path = Path(path)
    img = _read_raw(path)
    return to_bgr8(img, path)


def to_bgr8(img: np.ndarray, path: str | Path = "<frame>") -> np.ndarray:
    """Bring a decoded array (gray, BGR, BGRA; 8/16-bit or float) to 3-channel BGR uint8."""
    img = _to_uint8(img, path)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return np.ascontiguousarray(img)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    raise DataError(f"{path}: unsupported image layout {img.shape}; expected gray, BGR or BGRA")


def decode_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as a HxW uint8 array of 0/1 (any non-zero pixel is a defect)."""
    path = Path(path)
    img = _read_raw(path)
    if img.ndim == 3:
        img = img.max(axis=2)
    return (img > 0).astype(np.uint8)


def _read_raw(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    data = np.fromfile(str(path), dtype=np.uint8)  # fromfile + imdecode: works for non-ASCII paths
    if data.size == 0:
        raise DataError(f"{path}: the file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise DataError(f"{path}: cannot decode the image (corrupt, truncated or not an image)")
    return img


def _to_uint8(img: np.ndarray, path: str | Path) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)  # full 16-bit range onto 8 bit, like a camera's MSBs
    if np.issubdtype(img.dtype, np.floating):
        finite = np.nan_to_num(img.astype(np.float32))
        hi = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if hi <= 1.0 else 255.0 / hi
        return np.clip(finite * scale, 0, 255).round().astype(np.uint8)
    raise DataError(f"{path}: unsupported pixel type {img.dtype}")


# --------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Box:
    """The region of the model input that holds image content (the rest is letterbox padding)."""

    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class Geometry:
    """How an image becomes model input. Stored in the checkpoint; used by train, eval, export, run.

    ``squash`` resizes to height x width, ignoring aspect ratio (the paper's protocol).
    ``letterbox`` keeps the aspect ratio and pads with ``pad_value``; pixel metrics and overlays
    use only the content box.
    """

    height: int = 256
    width: int = 256
    resize: str = "squash"
    pad_value: int = 0

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise DataError(f"resize mode {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.height < 32 or self.width < 32 or self.height % 16 or self.width % 16:
            raise DataError(
                f"model size {self.height}x{self.width} must be multiples of 16 and at least 32 "
                "(the feature pyramid goes down to stride 16)"
            )

    def content_box(self, src_h: int, src_w: int) -> Box:
        if self.resize == "squash":
            return Box(0, 0, self.width, self.height)
        scale = min(self.height / src_h, self.width / src_w)
        w = max(1, round(src_w * scale))
        h = max(1, round(src_h * scale))
        x0 = (self.width - w) // 2
        y0 = (self.height - h) // 2
        return Box(x0, y0, x0 + w, y0 + h)

    def fit_image(self, img: np.ndarray) -> tuple[np.ndarray, Box]:
        """BGR uint8 image of any size -> BGR uint8 at model size, and its content box."""
        box = self.content_box(*img.shape[:2])
        w, h = box.x1 - box.x0, box.y1 - box.y0
        shrinking = w < img.shape[1] or h < img.shape[0]
        resized = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        if self.resize == "squash":
            return resized, box
        out = np.full((self.height, self.width, img.shape[2]), self.pad_value, dtype=np.uint8)
        out[box.y0 : box.y1, box.x0 : box.x1] = resized
        return out, box

    def fit_mask(self, mask: np.ndarray) -> np.ndarray:
        """0/1 mask of the source size -> 0/1 mask at model size (nearest neighbour)."""
        box = self.content_box(*mask.shape[:2])
        resized = cv2.resize(mask, (box.x1 - box.x0, box.y1 - box.y0), interpolation=cv2.INTER_NEAREST)
        out = np.zeros((self.height, self.width), dtype=np.uint8)
        out[box.y0 : box.y1, box.x0 : box.x1] = resized
        return out

    def unfit_map(self, amap: np.ndarray, src_h: int, src_w: int) -> np.ndarray:
        """Model-size map -> map over the original image (content box only, bilinear)."""
        box = self.content_box(src_h, src_w)
        crop = np.ascontiguousarray(amap[box.y0 : box.y1, box.x0 : box.x1], dtype=np.float32)
        return cv2.resize(crop, (src_w, src_h), interpolation=cv2.INTER_LINEAR)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------- data sets
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


def evenly_spaced(items: Sequence, n: int | None) -> list:
    """At most ``n`` items spread evenly over the sequence (so every defect type is represented)."""
    items = list(items)
    if n is None or len(items) <= n:
        return items
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def load_images(samples: Iterable[Sample], geometry: Geometry, progress: bool = False, desc: str = "images"):
    """Decode and fit every sample: (uint8 [N,H,W,3] BGR at model size, list of source (h, w))."""
    samples = list(samples)
    out = np.empty((len(samples), geometry.height, geometry.width, 3), dtype=np.uint8)
    sizes: list[tuple[int, int]] = []
    it = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc=f"loading {desc}", unit="img", leave=False)
    for i, s in enumerate(it):
        img = decode_image(s.path)
        out[i], _ = geometry.fit_image(img)
        sizes.append(img.shape[:2])
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
        m = decode_mask(s.mask_path)
        if m.shape[:2] != tuple(size):
            raise DataError(
                f"{s.mask_path}: mask is {m.shape[1]}x{m.shape[0]} but its image {s.path} is "
                f"{size[1]}x{size[0]}; masks must have the size of their image"
            )
        masks[i] = geometry.fit_mask(m)
        has[i] = True
    return masks, has


def content_mask(geometry: Geometry, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """bool [N,H,W]: True where model input holds image content (all True for ``squash``)."""
    out = np.zeros((len(sizes), geometry.height, geometry.width), dtype=bool)
    for i, (h, w) in enumerate(sizes):
        b = geometry.content_box(h, w)
        out[i, b.y0 : b.y1, b.x0 : b.x1] = True
    return out
