"""The training store: fixed-size records on disk, read back exactly, removed afterwards."""

import numpy as np
import pytest

from stfpm_edge.errors import DataError
from stfpm_edge.geometry import Geometry
from stfpm_edge.store import TrainingStore
from tests.conftest import write_image


def test_records_round_trip_by_index_slice_and_array():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 3, 4, 5)).astype(np.float32)
    with TrainingStore() as store:
        rec = store.records("x", (3, 4, 5), np.float32)
        rec.append(a[:4])
        rec.append(a[4:])
        assert len(rec) == 10 and rec.shape == (10, 3, 4, 5)
        np.testing.assert_array_equal(rec[2:7], a[2:7])
        np.testing.assert_array_equal(rec[np.array([9, 0, 3, 3])], a[[9, 0, 3, 3]])
        np.testing.assert_array_equal(rec[5], a[5])
        assert rec[8:20].shape == (2, 3, 4, 5) and rec[7:7].shape == (0, 3, 4, 5)
        with pytest.raises(IndexError):
            rec[np.array([10])]
        folder = store.folder
        assert (folder / "x.bin").stat().st_size == a.nbytes
    assert not folder.exists()  # removed on close


def test_images_are_fitted_and_a_bad_file_names_itself(tmp_path):
    good = write_image(tmp_path / "a.png", np.full((40, 60, 3), 7, np.uint8))
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not an image")
    geo = Geometry(32, 32)
    with TrainingStore() as store:
        imgs = store.images("train", [good, good], geo)
        assert imgs.shape == (2, 32, 32, 3) and int(imgs[1].max()) == 7
        with pytest.raises(DataError, match="b.png"):
            store.images("broken", [good, bad], geo)


def test_atomic_writes_clean_up_after_a_killed_writer(tmp_path):
    """A temporary file left by a process that died (kill -9 mid-write) goes at the next write."""
    from stfpm_edge.fileio import atomic_write_text

    target = tmp_path / "roc.png"
    orphan = tmp_path / ".roc.png.999999999.abc123.tmp"  # PID 999999999 does not exist
    orphan.write_bytes(b"")
    mine = tmp_path / f".roc.png.{__import__('os').getpid()}.live.tmp"  # a live writer's file stays
    mine.write_bytes(b"")
    atomic_write_text(target, "x")
    assert target.read_text() == "x" and not orphan.exists() and mine.exists()
