"""The calibration / evaluation file format: HDF5 with ``images`` and optional ``labels``.

Layout
------
- ``images``: shape (N, C, H, W), or (N, H, W, C) for a channels-last model (the file is in the
  model's own layout, see ``bwacal.model.detect_layout``), either

  - float32, model-ready (float16/float64 are accepted and converted), no attributes, or
  - uint8 with attributes ``scale`` (default 1/255) and optional per-channel ``mean`` and ``std``
    (length C, applied along the layout's channel axis); the reader returns ``(x * scale - mean) / std``
    as float32.

- ``labels`` (optional): shape (N,), integer class ids in [0, num_classes). Without labels,
  calibration is label-free.
- ``sources`` (optional): shape (N,), integer ids >= 0 of the source each image came from (a photo,
  a video, the original image of a set of crops); a held-out split can then keep whole sources apart
  (``bwacal.split``).

The reader streams: ``CalibrationData.batches`` reads one batch worth of rows at a time, so a
50,000-image file never sits whole in memory. Every problem with a file raises ``DataError`` with a
one-line message naming the file, the field and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from bwacal.errors import DataError
from bwacal.files import file_sha256, write_atomically

DEFAULT_SCALE = 1.0 / 255.0
NORMALISATION_ATTRS = ("scale", "mean", "std")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
# Rows read at a time when scanning float images for NaN/Inf (about 32 MiB of float32).
_SCAN_BYTES = 32 << 20
# What h5py raises on a corrupt file (truncated, flipped bits, lying headers); turned into DataError.
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)


def _h5_reason(exc: BaseException) -> str:
    message = str(exc).strip("'")  # KeyError quotes its message
    return f"{type(exc).__name__}: {message}"


class CalibrationData:
    """An open calibration file. Use ``open_dataset`` to create one; close it (or use ``with``).

    Attributes: ``path``, ``n`` (number of images), ``image_shape`` (C, H, W, or H, W, C when ``layout``
    is "nhwc"), ``layout``, ``has_labels``, ``num_classes_seen`` (largest label + 1, or None without labels),
    ``sources`` (int64 (N,) source ids, or None).
    """

    def __init__(self, path: Path, file: h5py.File, images: h5py.Dataset, labels: np.ndarray | None,
                 scale: float | None, mean: np.ndarray | None, std: np.ndarray | None,
                 sources: np.ndarray | None = None, layout: str = "nchw"):
        self.path = path
        self.layout = layout
        self._file = file
        self._images = images
        self._labels = labels
        self._scale = scale
        self._mean = mean
        self._std = std
        self.n = int(images.shape[0])
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        self.has_labels = labels is not None
        self.num_classes_seen = int(labels.max()) + 1 if labels is not None else None
        self.sources = sources

    def __len__(self) -> int:
        return self.n

    def __enter__(self) -> "CalibrationData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __repr__(self) -> str:
        labels = f"labels up to {self.num_classes_seen - 1}" if self.has_labels else "no labels"
        return f"CalibrationData({str(self.path)!r}, n={self.n}, image_shape={self.image_shape}, {labels})"

    def batches(self, batch_size: int, indices: Sequence[int] | np.ndarray | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yield ``(x float32 (B, *image_shape), y int64 (B,) or None)``, reading one batch at a time.

        Without ``indices`` the file is walked in order. With ``indices`` the batches follow that
        order (e.g. a shuffled epoch); each batch is read in ascending row order and put back.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if indices is None:
            for start in range(0, self.n, batch_size):
                stop = min(start + batch_size, self.n)
                yield self._to_model(self._rows(slice(start, stop))), self._label_slice(start, stop)
            return
        idx = self._check_indices(indices)
        for start in range(0, len(idx), batch_size):
            yield self.read(idx[start:start + batch_size])

    def read(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Images (float32, model-ready) and labels (int64 or None) at ``indices``, in that order."""
        idx = self._check_indices(indices)
        if len(idx) == 0:
            return np.zeros((0, *self.image_shape), np.float32), (np.zeros(0, np.int64) if self.has_labels else None)
        rows, inverse = np.unique(idx, return_inverse=True)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo <= 2 * len(rows):
            # dense enough: one contiguous hyperslab read is much faster than a point selection
            raw = self._rows(slice(lo, hi))[rows - lo]
        else:
            raw = self._rows(rows)  # h5py wants increasing indices
        x = self._to_model(raw[inverse])
        y = self._labels[idx] if self._labels is not None else None
        return x, y

    def sha256(self) -> str:
        """SHA-256 of the file's bytes, for provenance in reports and metadata."""
        return file_sha256(self.path)

    def _rows(self, selection) -> np.ndarray:
        try:
            return self._images[selection]
        except _H5_ERRORS as exc:
            raise DataError(f"{self.path}: cannot read 'images' ({_h5_reason(exc)}); the file is corrupt") from exc

    def _label_slice(self, start: int, stop: int) -> np.ndarray | None:
        return self._labels[start:stop] if self._labels is not None else None

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D sequence of integers, got shape {idx.shape} {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"{self.path}: index out of range [0, {self.n}): {int(idx.min())}..{int(idx.max())}")
        return idx

    def _to_model(self, raw: np.ndarray) -> np.ndarray:
        if self._scale is None:
            return raw.astype(np.float32, copy=False)
        x = raw.astype(np.float32) * np.float32(self._scale)
        per_channel = (-1, 1, 1) if self.layout == "nchw" else (-1,)
        if self._mean is not None:
            x -= self._mean.reshape(per_channel)
        if self._std is not None:
            x /= self._std.reshape(per_channel)
        return x


def open_dataset(path: str | os.PathLike, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, check_finite: bool = True, layout: str = "nchw") -> CalibrationData:
    """Open and validate a calibration file.

    ``input_shape`` is the model's per-image shape, (C, H, W) or (H, W, C) as ``layout`` ("nchw" or
    "nhwc", the model's) says, and ``num_classes`` its number of outputs; when given, the file must
    match them. Float images are scanned for NaN/Inf chunk by chunk (``check_finite``).
    Raises ``DataError`` naming the file, the field and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an HDF5 file")
    try:
        file = h5py.File(path, "r")
    except _H5_ERRORS:
        raise DataError(f"{path}: not an HDF5 file (expected datasets 'images' and optionally 'labels')") from None
    try:
        return _validate(path, file, input_shape, num_classes, check_finite, layout)
    except _H5_ERRORS as exc:
        file.close()
        raise DataError(f"{path}: corrupt or unreadable HDF5 file ({_h5_reason(exc)})") from exc
    except BaseException:
        file.close()
        raise


def _validate(path: Path, file: h5py.File, input_shape, num_classes, check_finite, layout) -> CalibrationData:
    if "images" not in file:
        found = ", ".join(repr(k) for k in file.keys()) or "nothing"
        raise DataError(f"{path}: no 'images' dataset (found {found}); expected images of shape (N, C, H, W)")
    images = file["images"]
    if not isinstance(images, h5py.Dataset):
        raise DataError(f"{path}: 'images' is a group, expected a dataset of shape (N, C, H, W)")
    if images.ndim != 4:
        raise DataError(f"{path}: 'images' has shape {images.shape}, expected rank 4 (N, C, H, W)")
    if images.shape[0] == 0:
        raise DataError(f"{path}: 'images' is empty (shape {images.shape}), expected at least one image")
    dims = tuple(int(d) for d in images.shape[1:])
    if min(dims) == 0:
        raise DataError(f"{path}: 'images' has shape {images.shape}, expected non-zero C, H and W")
    if input_shape is not None and tuple(int(d) for d in input_shape) != dims:
        axes = "C x H x W" if layout == "nchw" else "H x W x C, channels last"
        raise DataError(f"{path}: 'images' are {'x'.join(map(str, dims))} ({axes}) but the model expects "
                        + "x".join(str(int(d)) for d in input_shape))
    c = dims[_channel_axis(layout) - 1]

    dtype = images.dtype
    if dtype == np.uint8:
        scale, mean, std = _normalisation(path, images, c)
    elif dtype in _FLOAT_DTYPES:
        present = [a for a in NORMALISATION_ATTRS if a in images.attrs]
        if present:
            raise DataError(f"{path}: 'images' is {dtype} (model-ready) but has attribute '{present[0]}'; "
                            "scale/mean/std apply only to uint8 images")
        scale = mean = std = None
        if check_finite:
            _check_finite(path, images)
    else:
        raise DataError(f"{path}: 'images' has dtype {dtype}, expected uint8 or float32")

    labels = None
    if "labels" in file:
        labels = _read_labels(path, file["labels"], int(images.shape[0]), num_classes)
    sources = None
    if "sources" in file:
        sources = _read_sources(path, file["sources"], int(images.shape[0]))
    return CalibrationData(path, file, images, labels, scale, mean, std, sources, layout)


def _channel_axis(layout: str) -> int:
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
    return 1 if layout == "nchw" else 3


def peek_image_shape(path: str | os.PathLike) -> tuple:
    """The per-image shape of a calibration file's images, as stored; the file is checked in full
    when it is opened for the model (``open_dataset``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as file:
            images = file.get("images")
            if not isinstance(images, h5py.Dataset) or images.ndim != 4:
                raise DataError(f"{path}: no 'images' dataset of rank 4 (N, C, H, W) or (N, H, W, C)")
            return tuple(int(d) for d in images.shape[1:])
    except _H5_ERRORS:
        raise DataError(f"{path}: not an HDF5 file (expected datasets 'images' and optionally 'labels')") from None


def data_image_shape(path, input_shape=None) -> tuple | None:
    """The image shape a model with dynamic dims takes from the data file at ``path``: None when
    ``input_shape`` is given or the file cannot be read (opening it for the model reports its
    problem then, after the model's own)."""
    if input_shape is not None:
        return None
    try:
        return peek_image_shape(path)
    except DataError:
        return None


def _normalisation(path: Path, images: h5py.Dataset, channels: int):
    """The (scale, mean, std) attributes of uint8 images, checked; mean/std may be None."""
    attrs = images.attrs
    scale = DEFAULT_SCALE
    if "scale" in attrs:
        value = _numeric_attr(path, attrs, "scale", "one positive number")
        if value.size != 1 or not np.issubdtype(value.dtype, np.number):
            raise DataError(f"{path}: 'images' attribute 'scale' is {value.tolist()!r}, expected one positive number")
        scale = float(value.reshape(()))
        if not np.isfinite(scale) or scale <= 0:
            raise DataError(f"{path}: 'images' attribute 'scale' is {scale}, expected a positive finite number")
    mean = _channel_attr(path, attrs, "mean", channels)
    std = _channel_attr(path, attrs, "std", channels)
    if std is not None and np.any(std <= 0):
        raise DataError(f"{path}: 'images' attribute 'std' is {std.tolist()}, expected positive values")
    return scale, mean, std


def _numeric_attr(path: Path, attrs, name: str, expected: str) -> np.ndarray:
    """Read an attribute stored as numbers or text; refuse variable-length, compound and object data unread."""
    dtype = attrs.get_id(name).dtype
    if dtype.kind not in "biufS" and h5py.check_string_dtype(dtype) is None:
        raise DataError(f"{path}: 'images' attribute '{name}' is stored as {dtype}, expected {expected}")
    return np.asarray(attrs[name])


def _channel_attr(path: Path, attrs, name: str, channels: int) -> np.ndarray | None:
    if name not in attrs:
        return None
    value = _numeric_attr(path, attrs, name, f"{channels} numbers")
    if not np.issubdtype(value.dtype, np.number):
        raise DataError(f"{path}: 'images' attribute '{name}' is {value.tolist()!r}, expected {channels} numbers")
    value = value.astype(np.float32).reshape(-1)
    if value.size != channels:
        raise DataError(f"{path}: 'images' attribute '{name}' has {value.size} values, "
                        f"expected one per channel ({channels})")
    if not np.all(np.isfinite(value)):
        raise DataError(f"{path}: 'images' attribute '{name}' is {value.tolist()}, expected finite values")
    return value


def _check_finite(path: Path, images: h5py.Dataset) -> None:
    """Scan float images for NaN/Inf a block of rows at a time (never the whole file at once)."""
    row_bytes = int(np.prod(images.shape[1:])) * images.dtype.itemsize
    step = max(1, _SCAN_BYTES // row_bytes)
    for start in range(0, images.shape[0], step):
        block = images[start:start + step]
        bad = ~np.isfinite(block)
        if bad.any():
            first = start + int(np.argwhere(bad)[0][0])
            kind = "NaN" if np.isnan(block).any() else "Inf"
            raise DataError(f"{path}: 'images' contains {kind} (first at image {first}), expected finite values")


def _read_ids(path: Path, dataset, name: str, what: str, n: int) -> np.ndarray:
    """int64 (n,) ids >= 0 from the 1-D integer dataset ``name`` (``what``: "class" or "source")."""
    if not isinstance(dataset, h5py.Dataset):
        raise DataError(f"{path}: '{name}' is a group, expected a dataset of shape ({n},)")
    if dataset.ndim != 1:
        raise DataError(f"{path}: '{name}' has shape {dataset.shape}, expected ({n},)")
    if not np.issubdtype(dataset.dtype, np.integer):
        raise DataError(f"{path}: '{name}' has dtype {dataset.dtype}, expected integer {what} ids")
    if dataset.shape[0] != n:
        raise DataError(f"{path}: '{name}' has {dataset.shape[0]} entries but 'images' has {n}")
    values = dataset[()].astype(np.int64)
    if values.min() < 0:
        raise DataError(f"{path}: '{name}' contains {int(values.min())} (at index {int(values.argmin())}), "
                        f"expected {what} ids >= 0")
    return values


def _read_labels(path: Path, labels, n: int, num_classes: int | None) -> np.ndarray:
    values = _read_ids(path, labels, "labels", "class", n)
    if num_classes is not None and values.max() >= num_classes:
        raise DataError(f"{path}: 'labels' contains {int(values.max())} (at index {int(values.argmax())}), "
                        f"expected class ids in [0, {num_classes}) for a model with {num_classes} outputs")
    return values


def _read_sources(path: Path, sources, n: int) -> np.ndarray:
    return _read_ids(path, sources, "sources", "source", n)


def _ids_to_write(path: Path, name: str, ids, n: int) -> np.ndarray | None:
    """``ids`` (labels or sources) as int64 (n,) >= 0, or None when not given."""
    if ids is None:
        return None
    ids = np.asarray(ids)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer) or (n and ids.min() < 0):
        raise DataError(f"{path}: '{name}' has shape {ids.shape} dtype {ids.dtype}, "
                        f"expected ({n},) non-negative integers")
    return ids.astype(np.int64)


def write_dataset(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None,
                  scale: float | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, sources: np.ndarray | None = None,
                  layout: str = "nchw", class_names: Sequence[str] | None = None) -> Path:
    """Write a calibration file atomically (temporary file in the same folder, then rename).

    ``images`` (N, C, H, W), or (N, H, W, C) with ``layout="nhwc"``, is uint8 (``scale`` defaults to
    1/255; ``mean``/``std`` per channel) or float (stored as float32, model-ready, no normalisation
    attributes); ``sources`` (N,) optional integer source ids >= 0. Returns the path.
    """
    path = Path(path)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"{path}: 'images' has shape {images.shape}, expected non-empty (N, C, H, W)")
    n, c = images.shape[0], images.shape[_channel_axis(layout)]
    attrs: dict[str, object] = {}
    if images.dtype == np.uint8:
        attrs["scale"] = np.float64(DEFAULT_SCALE if scale is None else scale)
        if not np.isfinite(attrs["scale"]) or attrs["scale"] <= 0:
            raise DataError(f"{path}: 'images' attribute 'scale' is {scale}, expected a positive finite number")
        for name, value in (("mean", mean), ("std", std)):
            if value is None:
                continue
            arr = np.asarray(value, np.float64).reshape(-1)
            if arr.size != c or not np.all(np.isfinite(arr)):
                raise DataError(f"{path}: 'images' attribute '{name}' is {arr.tolist()}, expected {c} finite numbers")
            if name == "std" and np.any(arr <= 0):
                raise DataError(f"{path}: 'images' attribute 'std' is {arr.tolist()}, expected positive values")
            attrs[name] = arr
    elif images.dtype in _FLOAT_DTYPES:
        if scale is not None or mean is not None or std is not None:
            raise DataError(f"{path}: float 'images' are model-ready; scale/mean/std apply only to uint8 images")
        images = images.astype(np.float32, copy=False)
        if not np.all(np.isfinite(images)):
            raise DataError(f"{path}: 'images' contains NaN or Inf, expected finite values")
    else:
        raise DataError(f"{path}: 'images' has dtype {images.dtype}, expected uint8 or float32")
    labels = _ids_to_write(path, "labels", labels, n)
    sources = _ids_to_write(path, "sources", sources, n)

    path.parent.mkdir(parents=True, exist_ok=True)
    with write_atomically(path) as tmp:
        with h5py.File(tmp, "w") as f:
            chunk_rows = max(1, min(n, (1 << 20) // max(1, images[0].nbytes)))
            ds = f.create_dataset("images", data=images, chunks=(chunk_rows, *images.shape[1:]),
                                  compression="gzip", compression_opts=4, shuffle=True)
            for name, value in attrs.items():
                ds.attrs[name] = value
            if labels is not None:
                f.create_dataset("labels", data=labels)
                if class_names is not None:  # label k is class_names[k], e.g. an image folder's subfolders
                    f["labels"].attrs["class_names"] = np.array(list(class_names), dtype=h5py.string_dtype())
            if sources is not None:
                f.create_dataset("sources", data=sources)
    return path
