"""The optional ``sources`` dataset: written, read back, refused when malformed, and stored by make-calib."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from bwacal.data import open_dataset, write_dataset
from bwacal.errors import DataError
from bwacal.makecalib import make_calibration_file, read_npz_sources, sources_from_names
from cli.main import app

runner = CliRunner()


def images_numbered(n):
    """uint8 images whose first pixel is their index, so a subset can be traced back."""
    x = np.zeros((n, 1, 3, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def test_sources_round_trip(tmp_path):
    sources = np.array([3, 3, 0, 7, 7, 7], np.int32)
    path = write_dataset(tmp_path / "s.h5", images_numbered(6), np.arange(6) % 2, sources=sources)
    with open_dataset(path) as ds:
        assert ds.sources.dtype == np.int64
        np.testing.assert_array_equal(ds.sources, sources)
    with open_dataset(write_dataset(tmp_path / "none.h5", images_numbered(6))) as ds:
        assert ds.sources is None


def write_raw(path, sources):
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((4, 1, 2, 2), np.float32))
        if isinstance(sources, str):
            f.create_group("sources")
        else:
            f.create_dataset("sources", data=sources)
    return path


@pytest.mark.parametrize("sources, message", [
    ("group", "'sources' is a group, expected a dataset of shape (4,)"),
    (np.zeros((4, 1), np.int64), "'sources' has shape (4, 1), expected (4,)"),
    (np.zeros(4, np.float32), "'sources' has dtype float32, expected integer source ids"),
    (np.zeros(3, np.int64), "'sources' has 3 entries but 'images' has 4"),
    (np.array([0, 1, -2, 1]), "'sources' contains -2 (at index 2), expected source ids >= 0"),
])
def test_bad_sources_are_one_line_errors(tmp_path, sources, message):
    path = write_raw(tmp_path / "bad.h5", sources)
    with pytest.raises(DataError) as err:
        open_dataset(path)
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize("sources", [np.zeros(5, np.int64), np.zeros(6, np.float64), -np.ones(6, np.int64)])
def test_write_refuses_bad_sources(tmp_path, sources):
    with pytest.raises(DataError, match="'sources' has shape"):
        write_dataset(tmp_path / "o.h5", images_numbered(6), sources=sources)
    assert not (tmp_path / "o.h5").exists()


def test_make_calib_keeps_npz_sources_with_their_images(tmp_path):
    n = 40
    sources = np.arange(n) // 5 + 100
    np.savez(tmp_path / "a.npz", images=images_numbered(n)[:, 0], labels=np.arange(n) % 4, sources=sources)
    summary = make_calibration_file(tmp_path / "o.h5", source=tmp_path / "a.npz", count=12, seed=3)
    with open_dataset(tmp_path / "o.h5") as ds:
        x, _ = ds.read(np.arange(ds.n))
        index = np.round(x[:, 0, 0, 0] * 255).astype(int)
        np.testing.assert_array_equal(ds.sources, sources[index])
        assert summary["sources"] == len(np.unique(ds.sources))


def test_npz_bad_sources(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((3, 2, 2), np.uint8), sources=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="'sources' has 2 entries but 'images' has 3"):
        make_calibration_file(tmp_path / "o.h5", source=tmp_path / "a.npz", balanced=False)
    np.savez(tmp_path / "b.npz", images=np.zeros((3, 2, 2), np.uint8), sources=np.zeros(3, np.float32))
    with pytest.raises(DataError, match="'sources' has shape"):
        read_npz_sources(tmp_path / "b.npz", 3)


def test_sources_from_names(tmp_path):
    files = [tmp_path / name for name in ("b_1.png", "a_2.png", "b_3.jpg", "c.png", "a_x_y.png")]
    np.testing.assert_array_equal(sources_from_names(files, "_"), [1, 0, 1, 2, 0])
    with pytest.raises(DataError, match="--source-separator is empty"):
        sources_from_names(files, "")


def test_make_calib_folder_sources_from_file_names(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imgs"
    for cls in ("shirt", "shoe"):
        (root / cls).mkdir(parents=True)
        for photo in range(2):
            for crop in range(3):
                value = 10 * (cls == "shoe") + 3 * photo + crop  # traceable first pixel
                Image.fromarray(np.full((4, 4), value, np.uint8)).save(root / cls / f"{cls}{photo}-{crop}.png")
    out = tmp_path / "o.h5"
    result = runner.invoke(app, ["make-calib", str(root), "--size", "4", "--source-separator", "-", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "sources: 4 distinct" in result.output
    with open_dataset(out) as ds:
        x, y = ds.read(np.arange(ds.n))
        value = np.round(x[:, 0, 0, 0] * 255).astype(int)
        photo_key = (value >= 10).astype(int) * 2 + (value % 10) // 3  # shirt0, shirt1, shoe0, shoe1
        # the same photo always has the same id, different photos different ids
        assert len(np.unique(ds.sources)) == 4
        for key in range(4):
            assert len(np.unique(ds.sources[photo_key == key])) == 1
    result = runner.invoke(app, ["make-calib", str(tmp_path / "none.npz"), "--source-separator", "-",
                                 "-o", str(tmp_path / "p.h5")])
    assert result.exit_code == 2 and "--source-separator applies to image folders only" in result.output
