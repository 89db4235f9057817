"""Decoding, geometry and data-set discovery, including every bad-input case."""

import numpy as np
import pytest

from stfpm_edge.datasets import (
    Sample,
    discover,
    load_images,
    load_masks,
    split_train_val,
)
from stfpm_edge.errors import DataError
from stfpm_edge.geometry import Geometry
from tests.conftest import write_image


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "nope")
    with pytest.raises(DataError, match="not a data set"):
        discover(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        discover(tmp_path)


def test_mask_of_wrong_size_is_an_error(tmp_path):
    img = write_image(tmp_path / "test" / "crack" / "000.png", np.zeros((40, 50, 3), np.uint8))
    mask = write_image(tmp_path / "ground_truth" / "crack" / "000_mask.png", np.zeros((41, 50), np.uint8))
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
        write_image(tmp_path / "good" / f"{i}.jpg", np.full((30, 60, 3), i, np.uint8), ".jpg")
    write_image(tmp_path / "dent" / "a.png", np.zeros((30, 60, 3), np.uint8))
    write_image(tmp_path / "masks" / "dent" / "a_mask.png", np.zeros((30, 60), np.uint8))
    write_image(tmp_path / "dent" / "b.png", np.zeros((30, 60, 3), np.uint8))  # no mask
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


def test_load_images_fits_every_image(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", np.full((20 + i, 30, 3), i, np.uint8)) for i in range(3)]
    imgs, sizes = load_images([Sample(p, 0) for p in paths], Geometry(32, 48))
    assert imgs.shape == (3, 32, 48, 3) and sizes == [(20, 30), (21, 30), (22, 30)]
