"""The model-input contract: robust image decoding and the geometry that turns any image into model input.

Run side, torch-free on purpose: training, evaluation, export and the ONNX Runtime / TensorRT run
path all use this one definition. Normalisation (mean/std, colour order) is *not* here: it lives
inside the model (``model.STFPM.normalize``) and therefore inside the exported graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
RESIZE_MODES = ("squash", "letterbox")
MAX_SIDE = 4096  # model input; a 4096x4096 float map alone is 64 MB per frame


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
        if self.height > MAX_SIDE or self.width > MAX_SIDE:
            raise DataError(f"model size {self.height}x{self.width} is too large (at most {MAX_SIDE} per side); "
                            "for big frames use --roi, a smaller --size, or line-scan tiling")
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


# auto_size: the pixel count of the default 256 x 256 input, and how far from square the images must be before the input
# takes their aspect (squashing a 1.25:1 image changes its shapes by 25 %; within that, the square input of the paper)
AUTO_PIXELS = 256 * 256
AUTO_ASPECT_LIMIT = 1.25


def auto_size(sizes: list[tuple[int, int]], pixels: int = AUTO_PIXELS, limit: float = AUTO_ASPECT_LIMIT) -> tuple[int, int]:
    """The model input (height, width) for images of these (height, width): 256 x 256 when their median aspect is within
    ``limit`` of square, else their aspect at about ``pixels`` pixels, each side a multiple of 16 (a 2.5:1 part: 160 x 400)."""
    if not sizes:
        return 256, 256
    aspect = float(np.median([w / h for h, w in sizes]))
    if 1.0 / limit <= aspect <= limit:
        return 256, 256
    height = max(32, min(MAX_SIDE, int(round((pixels / aspect) ** 0.5 / 16)) * 16))
    width = max(32, min(MAX_SIDE, int(round(height * aspect / 16)) * 16))
    return height, width
