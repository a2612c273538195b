"""The calibration file reader and writer (``bwacal.data``)."""

from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np
import pytest

from bwacal import data as data_mod
from bwacal.data import open_dataset, write_dataset
from bwacal.errors import DataError


def reference(images_u8, scale=1 / 255, mean=None, std=None):
    """The documented normalisation, in float64: (x * scale - mean) / std."""
    x = images_u8.astype(np.float64) * scale
    c = x.shape[1]
    if mean is not None:
        x = x - np.asarray(mean, np.float64).reshape(1, c, 1, 1)
    if std is not None:
        x = x / np.asarray(std, np.float64).reshape(1, c, 1, 1)
    return x


def u8(n=20, c=3, h=5, w=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, c, h, w), dtype=np.uint8), rng.integers(0, 10, n)


def raw_h5(path, **datasets):
    """Write an HDF5 file by hand; a value may be (array, attrs) to set attributes."""
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            arr, attrs = value if isinstance(value, tuple) else (value, {})
            ds = f.create_dataset(name, data=arr)
            for k, v in attrs.items():
                ds.attrs[k] = v
    return path


class RecordingDataset:
    """Stands in for the h5py ``images`` dataset and records how many rows each read asks for."""

    def __init__(self, ds):
        self.ds = ds
        self.rows_per_read = []

    def __getitem__(self, sel):
        out = self.ds[sel]
        self.rows_per_read.append(out.shape[0])
        return out

    def __getattr__(self, name):
        return getattr(self.ds, name)


# ---- reading ---------------------------------------------------------------------------------


def test_uint8_with_mean_std_is_normalised(tmp_path):
    images, labels = u8()
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    path = write_dataset(tmp_path / "a.h5", images, labels, mean=mean, std=std)
    with open_dataset(path, input_shape=(3, 5, 4), num_classes=10) as ds:
        assert (ds.n, ds.image_shape, ds.has_labels) == (20, (3, 5, 4), True)
        assert ds.num_classes_seen == labels.max() + 1
        x, y = ds.read(np.arange(20))
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_allclose(x, reference(images, mean=mean, std=std), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y, labels)


def test_uint8_scale_defaults_to_1_over_255(tmp_path):
    images, _ = u8(c=1)
    path = raw_h5(tmp_path / "a.h5", images=images)
    with open_dataset(path) as ds:
        assert not ds.has_labels and ds.num_classes_seen is None
        x, y = ds.read([0, 1, 2])
    assert y is None
    np.testing.assert_allclose(x, reference(images[:3]), rtol=1e-6)


def test_uint8_custom_scale_without_mean_std(tmp_path):
    images, _ = u8(c=2)
    path = raw_h5(tmp_path / "a.h5", images=(images, {"scale": 0.5}))
    with open_dataset(path) as ds:
        x, _ = ds.read(np.arange(ds.n))
    np.testing.assert_allclose(x, reference(images, scale=0.5))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_float_images_are_model_ready(tmp_path, dtype):
    x0 = np.random.default_rng(1).normal(size=(7, 2, 3, 3)).astype(dtype)
    path = raw_h5(tmp_path / "f.h5", images=x0, labels=np.arange(7) % 3)
    with open_dataset(path, input_shape=(2, 3, 3), num_classes=3) as ds:
        (x, y), = list(ds.batches(100))
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, x0.astype(np.float32))
    np.testing.assert_array_equal(y, np.arange(7) % 3)


def test_write_float32_roundtrip(tmp_path):
    x0 = np.random.default_rng(2).normal(size=(5, 1, 4, 4)).astype(np.float32)
    path = write_dataset(tmp_path / "f.h5", x0)
    with open_dataset(path) as ds:
        np.testing.assert_array_equal(ds.read(np.arange(5))[0], x0)


def test_batches_in_file_order_cover_everything(tmp_path):
    images, labels = u8(n=23)
    path = write_dataset(tmp_path / "a.h5", images, labels)
    with open_dataset(path) as ds:
        parts = list(ds.batches(5))
    assert [len(y) for _, y in parts] == [5, 5, 5, 5, 3]
    np.testing.assert_allclose(np.concatenate([x for x, _ in parts]), reference(images), rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), labels)


def test_batches_with_indices_follow_their_order(tmp_path):
    images, labels = u8(n=50)
    path = write_dataset(tmp_path / "a.h5", images, labels)
    order = np.random.default_rng(3).permutation(50)[:37]
    order[5] = order[6]  # a repeated index is fine too
    with open_dataset(path) as ds:
        parts = list(ds.batches(8, indices=order))
    assert [len(y) for _, y in parts] == [8, 8, 8, 8, 5]
    np.testing.assert_allclose(np.concatenate([x for x, _ in parts]), reference(images[order]), rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), labels[order])


@pytest.mark.parametrize("use_indices", [False, True])
def test_batches_are_read_chunk_by_chunk(tmp_path, use_indices):
    images, labels = u8(n=400, c=1)
    path = write_dataset(tmp_path / "a.h5", images, labels)
    with open_dataset(path) as ds:
        spy = RecordingDataset(ds._images)
        ds._images = spy
        indices = np.random.default_rng(4).permutation(400) if use_indices else None
        got = np.concatenate([x for x, _ in ds.batches(16, indices=indices)])
    assert got.shape == (400, 1, 5, 4)
    assert len(spy.rows_per_read) >= 400 // 16
    # each read is one batch worth of rows (at most twice that when a contiguous span is cheaper)
    assert max(spy.rows_per_read) <= 32


def test_sparse_indices_use_a_sorted_point_selection(tmp_path):
    images, labels = u8(n=300, c=1)
    path = write_dataset(tmp_path / "a.h5", images, labels)
    with open_dataset(path) as ds:
        x, y = ds.read([290, 3, 150])
    np.testing.assert_allclose(x, reference(images[[290, 3, 150]]), rtol=1e-6)
    np.testing.assert_array_equal(y, labels[[290, 3, 150]])


def test_out_of_range_index(tmp_path):
    path = write_dataset(tmp_path / "a.h5", *u8(n=4))
    with open_dataset(path) as ds, pytest.raises(IndexError):
        ds.read([4])


def test_context_manager_closes_and_sha256_hashes_the_bytes(tmp_path):
    path = write_dataset(tmp_path / "a.h5", *u8())
    with open_dataset(path) as ds:
        assert ds.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
        f = ds._file
    assert not f.id.valid


def test_nan_scan_is_streamed(tmp_path, monkeypatch):
    x0 = np.zeros((300, 1, 4, 4), np.float32)
    x0[237, 0, 1, 2] = np.nan
    path = raw_h5(tmp_path / "f.h5", images=x0)
    reads = []
    real = data_mod._check_finite

    def spying_check(p, images):
        spy = RecordingDataset(images)
        try:
            real(p, spy)
        finally:
            reads.extend(spy.rows_per_read)

    monkeypatch.setattr(data_mod, "_SCAN_BYTES", 16 * 4 * 10)  # ten 1x4x4 float32 images per read
    monkeypatch.setattr(data_mod, "_check_finite", spying_check)
    with pytest.raises(DataError, match=r"'images' contains NaN \(first at image 237\)"):
        open_dataset(path)
    assert reads and max(reads) == 10 and len(reads) == 24


def test_writer_is_deterministic_and_atomic(tmp_path, monkeypatch):
    images, labels = u8()
    a = write_dataset(tmp_path / "a.h5", images, labels, mean=[0.5] * 3, std=[0.2] * 3)
    b = write_dataset(tmp_path / "b.h5", images, labels, mean=[0.5] * 3, std=[0.2] * 3)
    assert a.read_bytes() == b.read_bytes()

    before = a.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_dataset(a, images[:3], labels[:3])
    assert a.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=np.zeros((2, 1, 3, 3), np.int16)), "'images' has dtype int16, expected uint8 or float32"),
    (dict(images=np.zeros((1, 3, 3), np.uint8)), "'images' has shape (1, 3, 3), expected non-empty (N, C, H, W)"),
    (dict(images=np.zeros((2, 1, 3, 3), np.float32), mean=[0.0]), "scale/mean/std apply only to uint8"),
    (dict(images=np.zeros((2, 2, 3, 3), np.uint8), mean=[0.0]), "'mean' is [0.0], expected 2 finite numbers"),
    (dict(images=np.zeros((2, 1, 3, 3), np.uint8), std=[0.0]), "'std' is [0.0], expected positive values"),
    (dict(images=np.zeros((2, 1, 3, 3), np.uint8), labels=np.zeros(3, int)), "'labels' has shape (3,)"),
    (dict(images=np.full((2, 1, 3, 3), np.inf, np.float32)), "'images' contains NaN or Inf"),
])
def test_writer_rejects_bad_input(tmp_path, kwargs, message):
    path = tmp_path / "w.h5"
    with pytest.raises(DataError) as err:
        write_dataset(path, **kwargs)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []


# ---- every bad field, with its message ---------------------------------------------------------

GOOD = np.zeros((4, 1, 3, 3), np.uint8)
BAD_FILES = {
    "no images": (dict(pictures=GOOD), "no 'images' dataset (found 'pictures'); expected images of shape (N, C, H, W)"),
    "rank 3": (dict(images=np.zeros((4, 3, 3), np.uint8)), "'images' has shape (4, 3, 3), expected rank 4 (N, C, H, W)"),
    "empty": (dict(images=np.zeros((0, 1, 3, 3), np.uint8)), "'images' is empty (shape (0, 1, 3, 3)), expected at least one image"),
    "int16": (dict(images=np.zeros((4, 1, 3, 3), np.int16)), "'images' has dtype int16, expected uint8 or float32"),
    "scale <= 0": (dict(images=(GOOD, {"scale": -1.0})), "'images' attribute 'scale' is -1.0, expected a positive finite number"),
    "scale vector": (dict(images=(GOOD, {"scale": [1.0, 2.0]})), "'images' attribute 'scale' is [1.0, 2.0], expected one positive number"),
    "mean length": (dict(images=(GOOD, {"mean": [0.1, 0.2]})), "'images' attribute 'mean' has 2 values, expected one per channel (1)"),
    "mean text": (dict(images=(GOOD, {"mean": "zero"})), "'images' attribute 'mean' is 'zero', expected 1 numbers"),
    "std zero": (dict(images=(GOOD, {"std": [0.0]})), "'images' attribute 'std' is [0.0], expected positive values"),
    "std nan": (dict(images=(GOOD, {"std": [np.nan]})), "'images' attribute 'std' is [nan], expected finite values"),
    "float with mean": (dict(images=(GOOD.astype(np.float32), {"mean": [0.5]})),
                        "'images' is float32 (model-ready) but has attribute 'mean'; scale/mean/std apply only to uint8 images"),
    "inf": (dict(images=np.full((4, 1, 3, 3), -np.inf, np.float32)), "'images' contains Inf (first at image 0), expected finite values"),
    "label count": (dict(images=GOOD, labels=np.zeros(3, np.int64)), "'labels' has 3 entries but 'images' has 4"),
    "label float": (dict(images=GOOD, labels=np.zeros(4, np.float32)), "'labels' has dtype float32, expected integer class ids"),
    "label rank": (dict(images=GOOD, labels=np.zeros((4, 1), np.int64)), "'labels' has shape (4, 1), expected (4,)"),
    "label negative": (dict(images=GOOD, labels=np.array([0, 1, -3, 2])),
                       "'labels' contains -3 (at index 2), expected class ids >= 0"),
    "label range": (dict(images=GOOD, labels=np.array([0, 10, 2, 2])),
                    "'labels' contains 10 (at index 1), expected class ids in [0, 10) for a model with 10 outputs"),
    "input shape": (dict(images=np.zeros((4, 1, 28, 28), np.uint8)), "'images' are 1x28x28 (C x H x W) but the model expects 3x32x32"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_field_errors_name_file_and_field(tmp_path, case):
    datasets, message = BAD_FILES[case]
    path = raw_h5(tmp_path / "bad.h5", **datasets)
    shape = (3, 32, 32) if case == "input shape" else None
    with pytest.raises(DataError) as err:
        open_dataset(path, input_shape=shape, num_classes=10)
    assert str(err.value) == f"{path}: {message}"
    assert "\n" not in str(err.value)


def test_images_as_group(tmp_path):
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as f:
        f.create_group("images")
    with pytest.raises(DataError, match="'images' is a group, expected a dataset"):
        open_dataset(path)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.h5: file not found"):
        open_dataset(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match=r"junk\.h5: not an HDF5 file"):
        open_dataset(junk)
    with pytest.raises(DataError, match="is a directory"):
        open_dataset(tmp_path)


def test_committed_files_are_valid():
    """The calibration and validation files the README and the zoo cards use."""
    for name, n, per_class in (("data/fmnist_calib.h5", 1024, None), ("data/fmnist_val.h5", 2000, 200)):
        with open_dataset(name, input_shape=(1, 28, 28), num_classes=10) as ds:
            assert ds.n == n and ds.has_labels and ds.num_classes_seen == 10
            x, y = ds.read(np.arange(ds.n))
            counts = np.bincount(y, minlength=10)
            assert counts.max() - counts.min() <= 1
            if per_class:
                assert set(counts) == {per_class}
            # Fashion-MNIST statistics after the stored normalisation
            assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
