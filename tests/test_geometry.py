"""The model-input contract: decoding any image to BGR uint8, squash and letterbox geometry."""

import numpy as np
import pytest

from stfpm_edge.errors import DataError
from stfpm_edge.geometry import Geometry, decode_image
from tests.conftest import write_image


def test_grayscale_rgba_16bit_and_jpeg_decode_to_bgr8(tmp_path):
    gray = write_image(tmp_path / "g.png", np.full((10, 12), 77, np.uint8))
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[..., 3] = 10
    bgra = write_image(tmp_path / "a.png", rgba)
    deep = write_image(tmp_path / "d.png", np.full((10, 12), 40000, np.uint16))
    jpg = write_image(tmp_path / "j.jpg", np.full((10, 12, 3), 128, np.uint8), ".jpg")
    for p in (gray, bgra, deep, jpg):
        img = decode_image(p)
        assert img.dtype == np.uint8 and img.shape == (10, 12, 3), p
    assert decode_image(gray)[0, 0].tolist() == [77, 77, 77]
    assert decode_image(bgra)[0, 0].tolist() == [0, 0, 200]  # alpha dropped, colour kept
    assert decode_image(deep)[0, 0, 0] == 40000 >> 8


def test_corrupt_truncated_empty_and_missing_files_name_the_file(tmp_path):
    good = write_image(tmp_path / "ok.png", np.zeros((20, 20, 3), np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:30])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty, tmp_path / "missing.png"):
        with pytest.raises(DataError, match=bad.name):
            decode_image(bad)


def test_squash_and_letterbox_geometry():
    img = np.zeros((100, 250, 3), np.uint8)  # 2.5:1 crop of a part
    img[:, :125] = 255
    squash = Geometry(64, 64, "squash")
    out, box = squash.fit_image(img)
    assert out.shape == (64, 64, 3) and (box.x0, box.y0, box.x1, box.y1) == (0, 0, 64, 64)
    letter = Geometry(64, 64, "letterbox")
    out, box = letter.fit_image(img)
    assert out.shape == (64, 64, 3)
    assert (box.x1 - box.x0, box.y1 - box.y0) == (64, 26)  # aspect kept
    assert out[0].max() == 0 and out[box.y0 + 1, 5, 0] == 255  # padding above, content inside
    amap = np.zeros((64, 64), np.float32)
    amap[box.y0 : box.y1, 32:] = 1.0
    back = letter.unfit_map(amap, 100, 250)
    assert back.shape == (100, 250) and back[:, :100].max() < 0.5 and back[:, 150:].min() > 0.5
    mask = np.zeros((100, 250), np.uint8)
    mask[40:60, 200:240] = 1
    fitted = letter.fit_mask(mask)
    assert fitted.shape == (64, 64) and set(np.unique(fitted)) == {0, 1} and fitted[: box.y0].sum() == 0


def test_bad_geometry_is_rejected():
    with pytest.raises(DataError, match="multiples of 16"):
        Geometry(100, 100)
    with pytest.raises(DataError, match="resize mode"):
        Geometry(64, 64, "stretch")
