"""Build calibration files (see ``bwacal.data``) from common image sources.

Three sources are understood:

- an IDX pair in the MNIST / Fashion-MNIST layout (``read_idx``), gzipped or not;
- a folder with one subfolder of images per class (``read_image_folder``; needs Pillow);
- an ``.npz`` archive holding ``images`` and ``labels`` (``read_npz``).

Source ids (which photo, video or original image each image came from, for a held-out split by
source) are stored as ``sources`` when the input gives them: an ``.npz`` ``sources`` array, or for a
folder the part of each file name before a separator (``sources_from_names``).

``make_calibration_file`` picks a (optionally class-balanced) seeded subset and writes it
atomically with ``bwacal.data.write_dataset``. Every problem with the input raises ``DataError``.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from bwacal.errors import DataError

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, transparently gunzipped when the file starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST layout: magic ``00 00 TT NN``, NN big-endian uint32 dims, data).

    Returns the array in native byte order. Raises ``DataError`` for a bad magic number, an
    unknown type code, or a payload shorter or longer than the header promises.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (expected magic 00 00 <type> <ndim>, got {data[:4].hex(' ') or 'empty file'})")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX type code 0x{type_code:02x} (expected one of "
                        + ", ".join(f"0x{k:02x}" for k in _IDX_DTYPES) + ")")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions (expected at least 1)")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, expected {header_len})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes in"
        raise DataError(f"{path}: {what} IDX data: header shape {shape} needs {expected} bytes, file has {got}")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def read_idx_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 1, H, W) and int64 labels (N,) from an MNIST-layout IDX pair."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_path}: IDX images have shape {images.shape} dtype {images.dtype}, "
                        "expected uint8 (N, H, W)")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_path}: IDX labels have shape {labels.shape} dtype {labels.dtype}, "
                        "expected integer (N,)")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels but {images_path} holds {len(images)} images")
    if labels.size and labels.min() < 0:
        raise DataError(f"{labels_path}: label {int(labels.min())} is negative, expected class ids >= 0")
    return images[:, None], labels.astype(np.int64)


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (N, C, H, W) and labels (N,) or None from an ``.npz`` with ``images`` (and ``labels``).

    ``images`` may be (N, H, W), (N, C, H, W) or channels-last (N, H, W, C) with C in {1, 3};
    uint8 or float.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                found = ", ".join(repr(k) for k in archive.files) or "nothing"
                raise DataError(f"{path}: no 'images' array (found {found}); expected images and labels")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except DataError:
        raise
    except Exception as exc:  # np.load reports a damaged archive through many exception types
        raise DataError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim != 4:
        raise DataError(f"{path}: 'images' has shape {images.shape}, expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    if len(images) == 0:
        raise DataError(f"{path}: 'images' is empty, expected at least one image")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{path}: 'images' has dtype {images.dtype}, expected uint8 or float")
    if labels is not None:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: 'labels' has shape {labels.shape} dtype {labels.dtype}, expected integer (N,)")
        if len(labels) != len(images):
            raise DataError(f"{path}: 'labels' has {len(labels)} entries but 'images' has {len(images)}")
        if labels.size and labels.min() < 0:
            raise DataError(f"{path}: 'labels' contains {int(labels.min())}, expected class ids >= 0")
        labels = labels.astype(np.int64)
    return np.ascontiguousarray(images), labels


def read_npz_sources(path: str | Path, n: int) -> np.ndarray | None:
    """The optional ``sources`` array (N,) of non-negative integer source ids of an ``.npz``, as int64."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            sources = archive["sources"] if "sources" in archive.files else None
    except Exception as exc:  # np.load reports a damaged archive through many exception types
        raise DataError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    if sources is None:
        return None
    if sources.ndim != 1 or not np.issubdtype(sources.dtype, np.integer):
        raise DataError(f"{path}: 'sources' has shape {sources.shape} dtype {sources.dtype}, expected integer (N,)")
    if len(sources) != n:
        raise DataError(f"{path}: 'sources' has {len(sources)} entries but 'images' has {n}")
    if sources.size and sources.min() < 0:
        raise DataError(f"{path}: 'sources' contains {int(sources.min())}, expected source ids >= 0")
    return sources.astype(np.int64)


def sources_from_names(files: list[Path], separator: str) -> np.ndarray:
    """int64 source ids from file names: files whose stems agree before the first ``separator`` share
    a source (``photo12_crop3.png`` and ``photo12_crop4.png`` with ``"_"``); ids number the distinct
    prefixes in sorted order. A stem without the separator is its own source."""
    if not separator:
        raise DataError("--source-separator is empty, expected a string such as '_'")
    keys = [f.stem.split(separator, 1)[0] for f in files]
    names = sorted(set(keys))
    index = {k: i for i, k in enumerate(names)}
    return np.asarray([index[k] for k in keys], np.int64)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files, int64 labels and class names of a folder with one subfolder per class (sorted by name)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected one subfolder of images per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders found (expected <root>/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the class subfolders")
    return files, np.asarray(labels, np.int64), classes


def load_images(files: list[Path], size: int, channels: int | None = None) -> np.ndarray:
    """uint8 (N, C, size, size): shorter side resized to ``size`` (bilinear), then centre-cropped.

    C is ``channels`` (1: greyscale, 3: RGB) or, when None, 1 if every image is greyscale and
    otherwise 3. Needs Pillow (extra ``images``).
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("reading an image folder needs Pillow: pip install 'bwacal[images]'") from None
    grey_modes = {"1", "L", "LA", "I", "I;16", "F"}
    pictures, modes = [], set()
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                modes.add("L" if im.mode in grey_modes else "RGB")
                pictures.append(im.copy())
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{f}: cannot decode image ({exc})") from None
    mode = {1: "L", 3: "RGB"}[channels] if channels is not None else ("L" if modes == {"L"} else "RGB")
    out = np.empty((len(files), 1 if mode == "L" else 3, size, size), np.uint8)
    for i, im in enumerate(pictures):
        im = im.convert(mode)
        w, h = im.size
        ratio = size / min(w, h)
        nw, nh = max(size, round(w * ratio)), max(size, round(h * ratio))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        arr = np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out


def convert_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """(N, C, H, W) images with ``channels`` channels: greyscale repeated to RGB, or RGB to luminance
    (ITU-R 601-2, as Pillow's ``convert("L")``); None or the same count leaves them as they are."""
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if c == 3 and channels == 1:
        grey = np.tensordot(np.array([0.299, 0.587, 0.114]), images.astype(np.float64), axes=([0], [1]))[:, None]
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8) if images.dtype == np.uint8 else grey.astype(images.dtype)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels (expected 1 or 3 channels)")


def choose(labels: np.ndarray | None, n: int, count: int | None, balanced: bool | None, seed: int) -> np.ndarray:
    """Indices of the images to keep, in a seeded random order.

    ``balanced`` takes ``count // K`` images from each of the K classes present (the first
    ``count % K`` classes one more); None: balanced when there are labels. Without ``count`` every
    image is kept.
    """
    if balanced is None:
        balanced = labels is not None
    rng = np.random.default_rng(seed)
    if count is None:
        count = n
    if count < 1:
        raise DataError(f"--count is {count}, expected at least 1")
    if count > n:
        raise DataError(f"--count is {count} but the source holds only {n} images")
    if not balanced:
        return rng.permutation(n)[:count]
    if labels is None:
        raise DataError("--balanced needs labels but the source has none (use --no-balanced)")
    classes = np.unique(labels)
    base, extra = divmod(count, len(classes))
    chosen = []
    for i, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        want = base + (1 if i < extra else 0)
        if want > len(members):
            raise DataError(f"class {int(c)} has {len(members)} images but a balanced set of {count} "
                            f"over {len(classes)} classes needs {want} (lower --count or use --no-balanced)")
        chosen.append(rng.choice(members, size=want, replace=False))
    return rng.permutation(np.concatenate(chosen))


def parse_channels(text: str | None, option: str) -> list[float] | None:
    """``"0.485,0.456,0.406"`` -> [0.485, 0.456, 0.406]; None stays None."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise DataError(f"{option} is {text!r}, expected comma-separated numbers, one per channel") from None


def make_calibration_file(out: str | Path, *, idx_images: str | Path | None = None,
                          idx_labels: str | Path | None = None, source: str | Path | None = None,
                          count: int | None = None, balanced: bool | None = None, seed: int = 0,
                          size: int | None = None, mean: list[float] | None = None,
                          std: list[float] | None = None, force: bool = False,
                          source_separator: str | None = None, channels: int | None = None,
                          layout: str = "nchw") -> dict:
    """Build a calibration file from one source; returns a summary (path, n, shape, classes, class
    names, sources).

    The source is either an IDX pair (``idx_images`` + ``idx_labels``) or ``source``: a folder of
    class subfolders (needs ``size``; its class names, in label order, are stored with the labels)
    or an ``.npz`` file. ``channels`` (1 or 3) converts the images to greyscale or RGB. ``balanced``
    None is balanced when the source has labels. Source ids are stored when the input gives them:
    the ``.npz``'s ``sources`` array, or for a folder with ``source_separator`` the file-name
    prefixes (``sources_from_names``). ``layout`` "nhwc" stores the images channels last, for a
    channels-last model. The output is written atomically and an existing file is only replaced
    with ``force``.
    """
    from bwacal.data import write_dataset
    from bwacal.files import check_output_path

    out = Path(out)
    check_output_path(out, [p for p in (idx_images, idx_labels, source) if p is not None], force)
    if (idx_images is None) != (idx_labels is None):
        raise DataError("an IDX source needs both --idx-images and --idx-labels")
    if (idx_images is None) == (source is None):
        raise DataError("give exactly one source: --idx-images/--idx-labels, a folder of class subfolders, or an .npz file")
    if source_separator is not None and (source is None or not Path(source).is_dir()):
        raise DataError("--source-separator applies to image folders only (an .npz gives its own 'sources')")

    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
    sources = class_names = None
    if idx_images is not None:
        images, labels = read_idx_pair(idx_images, idx_labels)
        described = f"idx:{idx_images},{idx_labels}"
    elif Path(source).is_dir():
        if size is None:
            raise DataError(f"{source}: an image folder needs --size (the side of the centre crop)")
        files, all_labels, class_names = list_image_folder(source)
        keep = choose(all_labels, len(files), count, balanced, seed)
        images, labels = load_images([files[i] for i in keep], size, channels), all_labels[keep]
        if source_separator is not None:
            sources = sources_from_names(files, source_separator)[keep]
        described = f"folder:{source}"
    elif Path(source).suffix.lower() == ".npz":
        images, labels = read_npz(source)
        sources = read_npz_sources(source, len(images))
        described = f"npz:{source}"
    else:
        raise DataError(f"{source}: expected a folder of class subfolders or an .npz file")

    if idx_images is not None or not Path(source).is_dir():
        if size is not None and images.shape[2:] != (size, size):
            raise DataError(f"--size {size} does not match the source's {images.shape[2]}x{images.shape[3]} "
                            "images (resizing applies to image folders only)")
        keep = choose(labels, len(images), count, balanced, seed)
        images = images[keep]
        labels = labels[keep] if labels is not None else None
        sources = sources[keep] if sources is not None else None

    images = convert_channels(images, channels)
    if images.dtype != np.uint8 and (mean is not None or std is not None):
        raise DataError(f"{described}: images are {images.dtype} (stored model-ready); --mean/--std apply only to uint8 images")
    c = images.shape[1]
    for option, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) != c:
            raise DataError(f"{option} has {len(values)} values but the images have {c} channel(s)")
    if layout == "nhwc":
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    write_dataset(out, images, labels, mean=mean, std=std, sources=sources, layout=layout,
                  class_names=class_names)
    return {
        "path": out,
        "n": len(images),
        "image_shape": (c, *images.shape[1:3]) if layout == "nhwc" else tuple(images.shape[1:]),
        "dtype": str(images.dtype),
        "classes": None if labels is None else np.bincount(labels, minlength=len(class_names or ())).tolist(),
        "class_names": class_names,
        "source": described,
        "sources": None if sources is None else len(np.unique(sources)),
    }
