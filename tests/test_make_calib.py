"""``bwacal make-calib`` and the readers behind it (``bwacal.makecalib``)."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from bwacal.data import open_dataset
from bwacal.errors import DataError
from bwacal.makecalib import choose, make_calibration_file, read_idx, read_idx_pair, read_npz
from cli.main import app

runner = CliRunner()


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode an array in the IDX layout (big-endian dims, uint8 or int32 payload)."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[arr.dtype]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, gz=False):
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


@pytest.fixture
def idx_pair(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 6, 5), dtype=np.uint8)
    labels = np.repeat(np.arange(3, dtype=np.uint8), 20)
    rng.shuffle(labels)
    return (write_idx(tmp_path / "img.idx.gz", images, gz=True), write_idx(tmp_path / "lab.idx", labels),
            images, labels)


def run(*args):
    result = runner.invoke(app, ["make-calib", *map(str, args)])
    return result.exit_code, result.output


# ---- IDX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    got = read_idx(write_idx(tmp_path / "a", arr, gz=gz))
    np.testing.assert_array_equal(got, arr)
    assert got.dtype.isnative


@pytest.mark.parametrize("mangle, message", [
    (lambda raw: raw[:-7], "truncated IDX data: header shape (4, 3, 3) needs 36 bytes, file has 29"),
    (lambda raw: raw + b"\x00", "trailing bytes in IDX data: header shape (4, 3, 3) needs 36 bytes, file has 37"),
    (lambda raw: raw[:9], "truncated IDX header (9 bytes, expected 16)"),
    (lambda raw: b"\x01" + raw[1:], "not an IDX file (expected magic 00 00 <type> <ndim>, got 01 00 08 03)"),
    (lambda raw: raw[:2] + b"\x07" + raw[3:], "unknown IDX type code 0x07"),
    (lambda raw: b"", "not an IDX file (expected magic 00 00 <type> <ndim>, got empty file)"),
])
def test_read_idx_rejects_damaged_files(tmp_path, mangle, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(mangle(idx_bytes(np.zeros((4, 3, 3), np.uint8))))
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    good = gzip.compress(idx_bytes(np.zeros((50, 8, 8), np.uint8)), mtime=0)
    path.write_bytes(good[: len(good) // 2])  # cut in the middle of the deflate stream
    with pytest.raises(DataError, match=r"bad\.gz: corrupt gzip stream"):
        read_idx(path)
    flipped = bytearray(good)
    flipped[-6] ^= 0xFF  # damage the CRC trailer
    path.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="corrupt gzip stream"):
        read_idx(path)


def test_idx_pair_count_mismatch(tmp_path):
    images = write_idx(tmp_path / "i", np.zeros((5, 2, 2), np.uint8))
    labels = write_idx(tmp_path / "l", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=r"l: 4 labels but .*i holds 5 images"):
        read_idx_pair(images, labels)
    with pytest.raises(DataError, match=r"IDX images have shape \(4,\)"):
        read_idx_pair(labels, labels)


def test_idx_pair_to_file(tmp_path, idx_pair):
    img, lab, images, labels = idx_pair
    out = tmp_path / "c.h5"
    summary = make_calibration_file(out, idx_images=img, idx_labels=lab, count=30, seed=1,
                                    mean=[0.5], std=[0.25])
    assert summary["classes"] == [10, 10, 10]
    with open_dataset(out, input_shape=(1, 6, 5), num_classes=3) as ds:
        x, y = ds.read(np.arange(ds.n))
    # every stored image is a source image with its own label, normalised as asked
    raw = np.rint((x * 0.25 + 0.5) * 255).astype(np.uint8)[:, 0]
    for image, label in zip(raw, y):
        match = np.flatnonzero((images == image).all(axis=(1, 2)))
        assert len(match) and labels[match[0]] == label


# ---- choosing the subset -----------------------------------------------------------------------


def test_choose_balanced_is_seeded_and_balanced():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    a = choose(labels, 100, 31, balanced=True, seed=5)
    assert len(set(a)) == 31
    assert np.bincount(labels[a]).tolist() == [11, 10, 10]
    np.testing.assert_array_equal(a, choose(labels, 100, 31, balanced=True, seed=5))
    assert not np.array_equal(a, choose(labels, 100, 31, balanced=True, seed=6))


def test_choose_errors():
    labels = np.array([0] * 50 + [1] * 5)
    with pytest.raises(DataError, match="class 1 has 5 images but a balanced set of 20 over 2 classes needs 10"):
        choose(labels, 55, 20, balanced=True, seed=0)
    with pytest.raises(DataError, match="--count is 56 but the source holds only 55 images"):
        choose(labels, 55, 56, balanced=False, seed=0)
    with pytest.raises(DataError, match="--balanced needs labels"):
        choose(None, 55, 5, balanced=True, seed=0)
    assert sorted(choose(None, 55, None, balanced=False, seed=0)) == list(range(55))


# ---- .npz --------------------------------------------------------------------------------------


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=nhwc, labels=np.arange(6) % 2)
    images, labels = read_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(images, nhwc.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "b.npz", images=nhwc[..., 0])
    images, labels = read_npz(tmp_path / "b.npz")
    assert images.shape == (6, 1, 4, 5) and labels is None


def test_npz_float_images_stay_model_ready(tmp_path):
    x = np.random.default_rng(2).normal(size=(8, 1, 3, 3))
    np.savez(tmp_path / "f.npz", images=x, labels=np.arange(8) % 2)
    out = tmp_path / "f.h5"
    make_calibration_file(out, source=tmp_path / "f.npz", seed=0)
    with open_dataset(out) as ds:
        got, y = ds.read(np.arange(8))
    order = [int(np.flatnonzero(np.isclose(x[:, 0, 0, 0], v))[0]) for v in got[:, 0, 0, 0]]
    np.testing.assert_allclose(got, x[order].astype(np.float32))
    np.testing.assert_array_equal(y, np.arange(8)[order] % 2)


@pytest.mark.parametrize("arrays, message", [
    (dict(pictures=np.zeros((2, 3, 3), np.uint8)), "no 'images' array (found 'pictures')"),
    (dict(images=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(3, np.int64)), "'labels' has 3 entries but 'images' has 2"),
    (dict(images=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(2, np.float32)), "'labels' has shape (2,) dtype float32"),
    (dict(images=np.zeros((2, 3), np.uint8)), "'images' has shape (2, 3), expected (N, H, W)"),
    (dict(images=np.zeros((2, 3, 3), np.int16)), "'images' has dtype int16, expected uint8 or float"),
    (dict(images=np.zeros((0, 3, 3), np.uint8)), "'images' is empty"),
])
def test_bad_npz(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        read_npz(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_npz_that_is_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz archive"):
        read_npz(path)


# ---- image folders -----------------------------------------------------------------------------


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match=r"needs Pillow: pip install 'bwacal\[images\]'"):
        make_calibration_file(tmp_path / "o.h5", source=tmp_path, size=4, balanced=False)
    assert not (tmp_path / "o.h5").exists()


def test_image_folder_resize_and_centre_crop(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imgs"
    # a 20x10 (w x h) picture, white in the middle 14 columns and black at the sides
    wide = np.zeros((10, 20, 3), np.uint8)
    wide[:, 3:17] = 255
    for cls, n in (("a", 3), ("b", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(wide).save(root / cls / f"{i}.png")
    (root / "b" / "notes.txt").write_text("not an image")
    out = tmp_path / "o.h5"
    summary = make_calibration_file(out, source=root, size=5, count=4, seed=0)
    assert summary["classes"] == [2, 2] and summary["image_shape"] == (3, 5, 5)
    with open_dataset(out, input_shape=(3, 5, 5)) as ds:
        x, _ = ds.read(np.arange(4))
    # shorter side 10 -> 5, width 20 -> 10; the centre 5 columns hold only the white band
    assert x.min() > 0.9


def test_image_folder_greyscale_gives_one_channel(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    (tmp_path / "x").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "x" / f"{i}.png")
    summary = make_calibration_file(tmp_path / "o.h5", source=tmp_path, size=8)
    assert summary["image_shape"] == (1, 8, 8)


def test_image_folder_with_corrupt_image_leaves_no_file(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, output = run(tmp_path / "src", "--size", 4, "-o", tmp_path / "o.h5")
    assert code == 2 and "broken.png: cannot decode image" in output
    assert not (tmp_path / "o.h5").exists()


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="no class subfolders"):
        make_calibration_file(tmp_path / "o.h5", source=tmp_path, size=4)


# ---- the command -------------------------------------------------------------------------------


def test_cli_builds_idx_file(tmp_path, idx_pair):
    img, lab, _, _ = idx_pair
    out = tmp_path / "calib.h5"
    code, output = run("--idx-images", img, "--idx-labels", lab, "--count", 12, "--seed", 3,
                       "--mean", "0.3", "--std", "0.4", "-o", out)
    assert code == 0, output
    assert f"wrote {out}: 12 images 1x6x5 uint8" in output and "per class: 0:4, 1:4, 2:4" in output
    with h5py.File(out, "r") as f:
        attrs = dict(f["images"].attrs)
        assert f["images"].shape == (12, 1, 6, 5) and f["images"].dtype == np.uint8
    assert attrs["mean"].tolist() == [0.3] and attrs["std"].tolist() == [0.4]
    assert attrs["scale"] == pytest.approx(1 / 255)

    # the same command with the same seed gives the same bytes
    again = tmp_path / "again.h5"
    run("--idx-images", img, "--idx-labels", lab, "--count", 12, "--seed", 3, "--mean", "0.3",
        "--std", "0.4", "-o", again)
    assert again.read_bytes() == out.read_bytes()


def test_cli_refuses_to_overwrite_without_force(tmp_path, idx_pair):
    img, lab, _, _ = idx_pair
    out = tmp_path / "calib.h5"
    out.write_bytes(b"precious")
    code, output = run("--idx-images", img, "--idx-labels", lab, "-o", out)
    assert code == 2 and "already exists; pass --force to overwrite it" in output
    assert out.read_bytes() == b"precious"
    code, _ = run("--idx-images", img, "--idx-labels", lab, "--force", "-o", out)
    assert code == 0 and out.read_bytes()[:4] == b"\x89HDF"


def _corrupt_inputs(tmp_path, idx_pair):
    img, lab, images, labels = idx_pair
    short_gz = tmp_path / "short.gz"
    short_gz.write_bytes(img.read_bytes()[:100])
    truncated = write_idx(tmp_path / "trunc.idx", images)
    truncated.write_bytes(truncated.read_bytes()[:-1])
    fewer = write_idx(tmp_path / "fewer.idx", labels[:-1])
    junk_npz = tmp_path / "junk.npz"
    junk_npz.write_bytes(b"junk")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    return {
        "corrupt gz": (["--idx-images", short_gz, "--idx-labels", lab], "corrupt gzip stream"),
        "truncated idx": (["--idx-images", truncated, "--idx-labels", lab], "truncated IDX data"),
        "count mismatch": (["--idx-images", img, "--idx-labels", fewer], "59 labels but"),
        "only images": (["--idx-images", img], "needs both --idx-images and --idx-labels"),
        "two sources": ([junk_npz, "--idx-images", img, "--idx-labels", lab], "give exactly one source"),
        "no source": ([], "give exactly one source"),
        "bad npz": ([junk_npz], "not a readable .npz archive"),
        "unknown kind": ([text], "expected a folder of class subfolders or an .npz file"),
        "missing file": (["--idx-images", tmp_path / "nope", "--idx-labels", lab], "nope: file not found"),
        "too many": (["--idx-images", img, "--idx-labels", lab, "--count", 61], "--count is 61 but the source holds only 60"),
        "mean channels": (["--idx-images", img, "--idx-labels", lab, "--mean", "0.1,0.2"],
                          "--mean has 2 values but the images have 1 channel(s)"),
        "mean text": (["--idx-images", img, "--idx-labels", lab, "--mean", "abc"], "--mean is 'abc', expected comma-separated"),
        "std zero": (["--idx-images", img, "--idx-labels", lab, "--std", "0"], "'std' is [0.0], expected positive values"),
        "size mismatch": (["--idx-images", img, "--idx-labels", lab, "--size", 28], "--size 28 does not match"),
    }


def test_cli_bad_inputs_exit_2_and_leave_no_file(tmp_path, idx_pair):
    for name, (args, message) in _corrupt_inputs(tmp_path, idx_pair).items():
        before = sorted(p.name for p in tmp_path.iterdir())
        code, output = run(*args, "-o", tmp_path / "out.h5")
        assert code == 2, (name, output)
        lines = output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, output)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_committed_val_file_is_rebuilt_byte_for_byte(tmp_path):
    """The README's command for data/fmnist_val.h5 reproduces the committed file exactly."""
    out = tmp_path / "val.h5"
    code, output = run("--idx-images", FMNIST / "t10k-images-idx3-ubyte.gz",
                       "--idx-labels", FMNIST / "t10k-labels-idx1-ubyte.gz", "--count", 2000, "--balanced",
                       "--seed", 0, "--mean", "0.2860", "--std", "0.3530", "-o", out)
    assert code == 0, output
    committed = Path(__file__).resolve().parent.parent / "data" / "fmnist_val.h5"
    assert out.read_bytes() == committed.read_bytes()


# ---- what a new user meets (issue 17) ----------------------------------------------------------


def _folder(root, classes=("cat", "dog"), n=3, size=(10, 12), grey=False):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(n):
            shape = size if grey else (*size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_the_class_map_is_printed_and_stored(tmp_path):
    src = _folder(tmp_path / "imgs", classes=("zebra", "ant", "moth"))
    out = tmp_path / "o.h5"
    code, output = run(src, "--size", 8, "-o", out)
    assert code == 0, output
    assert "classes (label: folder, images): 0: ant 3, 1: moth 3, 2: zebra 3" in output
    with h5py.File(out, "r") as f:
        assert [str(c) for c in f["labels"].attrs["class_names"].astype(str)] == ["ant", "moth", "zebra"]
    with open_dataset(out) as ds:  # the reader takes the attribute in its stride
        assert ds.n == 9 and ds.has_labels


def test_grayscale_and_rgb_convert_the_images(tmp_path):
    src = _folder(tmp_path / "imgs")
    code, output = run(src, "--size", 8, "--grayscale", "-o", tmp_path / "g.h5")
    assert code == 0 and "1x8x8" in output, output
    grey = _folder(tmp_path / "grey", grey=True)
    code, output = run(grey, "--size", 8, "--rgb", "-o", tmp_path / "c.h5")
    assert code == 0 and "3x8x8" in output, output
    with h5py.File(tmp_path / "c.h5", "r") as f:
        x = f["images"][:]
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 1], x[:, 2])
    # arrays (IDX, .npz) convert the same way: RGB to ITU-R 601-2 luminance, as Pillow does
    from bwacal.makecalib import convert_channels

    rgb = np.random.default_rng(1).integers(0, 256, (4, 3, 5, 5), dtype=np.uint8)
    ImageModule = pytest.importorskip("PIL.Image")
    pil = np.asarray(ImageModule.fromarray(rgb[0].transpose(1, 2, 0)).convert("L"))
    assert np.abs(convert_channels(rgb, 1)[0, 0].astype(int) - pil).max() <= 1


def test_size_channels_and_layout_come_from_the_model(tmp_path):
    from tests.tiny_models import save, tiny_classifier

    model = save(tiny_classifier(), tmp_path / "m.onnx")  # takes 1x8x8 (tests/tiny_models.py)
    import bwacal

    c, h, w = bwacal.load_model(model).input_shape
    assert (c, h, w) == (1, 8, 8)
    src = _folder(tmp_path / "imgs", size=(20, 30))  # RGB pictures, 30x20: cropped and made greyscale
    out = tmp_path / "o.h5"
    code, output = run(src, "--model", model, "-o", out)
    assert code == 0, output
    assert f"{c}x{h}x{w}" in output
    with open_dataset(out, input_shape=(c, h, w)) as ds:
        assert ds.n == 6


def test_unlabelled_npz_needs_no_flag_and_old_out_still_works(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((6, 4, 4), np.uint8))
    code, output = run(tmp_path / "x.npz", "--count", 4, "--out", tmp_path / "o.h5")
    assert code == 0, output
    assert "no labels" in output
    with open_dataset(tmp_path / "o.h5") as ds:
        assert ds.n == 4 and not ds.has_labels
    code, output = run(tmp_path / "x.npz", "--out", tmp_path / "a.h5", "-o", tmp_path / "b.h5")
    assert code == 2 and "--out is the old name of --output" in output
