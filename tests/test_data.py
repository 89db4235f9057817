"""Decoding, geometry and data-set discovery, including every bad-input case."""

import cv2
import numpy as np
import pytest

from stfpm_edge.datasets import Sample, discover, load_images, load_masks, split_train_val
from stfpm_edge.geometry import Geometry, decode_image
from stfpm_edge.errors import DataError


def _write(path, img, ext=".png"):
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def test_grayscale_rgba_16bit_and_jpeg_decode_to_bgr8(tmp_path):
    gray = _write(tmp_path / "g.png", np.full((10, 12), 77, np.uint8))
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[..., 3] = 10
    bgra = _write(tmp_path / "a.png", rgba)
    deep = _write(tmp_path / "d.png", np.full((10, 12), 40000, np.uint16))
    jpg = _write(tmp_path / "j.jpg", np.full((10, 12, 3), 128, np.uint8), ".jpg")
    for p in (gray, bgra, deep, jpg):
        img = decode_image(p)
        assert img.dtype == np.uint8 and img.shape == (10, 12, 3), p
    assert decode_image(gray)[0, 0].tolist() == [77, 77, 77]
    assert decode_image(bgra)[0, 0].tolist() == [0, 0, 200]  # alpha dropped, colour kept
    assert decode_image(deep)[0, 0, 0] == 40000 >> 8


def test_corrupt_truncated_empty_and_missing_files_name_the_file(tmp_path):
    good = _write(tmp_path / "ok.png", np.zeros((20, 20, 3), np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:30])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty, tmp_path / "missing.png"):
        with pytest.raises(DataError, match=bad.name):
            decode_image(bad)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "nope")
    with pytest.raises(DataError, match="not a data set"):
        discover(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        discover(tmp_path)


def test_mask_of_wrong_size_is_an_error(tmp_path):
    img = _write(tmp_path / "test" / "crack" / "000.png", np.zeros((40, 50, 3), np.uint8))
    mask = _write(tmp_path / "ground_truth" / "crack" / "000_mask.png", np.zeros((41, 50), np.uint8))
    geo = Geometry(32, 32)
    with pytest.raises(DataError, match="000_mask.png"):
        load_masks([Sample(img, 1, "crack", mask)], [(40, 50)], geo)


def test_mvtec_layout_discovery(synthetic_mvtec):
    ds = discover(synthetic_mvtec)
    assert ds.layout == "mvtec" and len(ds.train) == 16
    defects = [s for s in ds.test if s.label == 1]
    assert len(defects) == 6 and all(s.mask_path is not None for s in defects)
    assert {s.defect for s in defects} == {"scratch", "stain", "hole"}


def test_folder_layout_holds_out_good_images_for_testing(tmp_path):
    for i in range(10):
        _write(tmp_path / "good" / f"{i}.jpg", np.full((30, 60, 3), i, np.uint8), ".jpg")
    _write(tmp_path / "dent" / "a.png", np.zeros((30, 60, 3), np.uint8))
    _write(tmp_path / "masks" / "dent" / "a_mask.png", np.zeros((30, 60), np.uint8))
    _write(tmp_path / "dent" / "b.png", np.zeros((30, 60, 3), np.uint8))  # no mask
    ds = discover(tmp_path, seed=3)
    assert ds.layout == "folder"
    assert len(ds.train) == 8 and sum(s.label == 0 for s in ds.test) == 2
    masks = {s.path.name: s.mask_path for s in ds.test if s.label}
    assert masks["a.png"] is not None and masks["b.png"] is None
    # the same seed gives the same split
    assert [s.path for s in discover(tmp_path, seed=3).train] == [s.path for s in ds.train]


def test_split_train_val_is_seeded_and_disjoint():
    samples = [Sample(f"{i}.png", 0) for i in range(10)]
    a_train, a_val = split_train_val(samples, 0.2, 5)
    b_train, b_val = split_train_val(samples, 0.2, 5)
    assert a_val == b_val and len(a_val) == 2 and not set(map(id, a_train)) & set(map(id, a_val))


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


def test_load_images_fits_every_image(tmp_path):
    paths = [_write(tmp_path / f"{i}.png", np.full((20 + i, 30, 3), i, np.uint8)) for i in range(3)]
    imgs, sizes = load_images([Sample(p, 0) for p in paths], Geometry(32, 48))
    assert imgs.shape == (3, 32, 48, 3) and sizes == [(20, 30), (21, 30), (22, 30)]
