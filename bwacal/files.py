"""Files bwacal writes or vouches for: atomic writes, SHA-256 digests, checks of output paths.

Every command writes through ``write_atomically`` (a temporary file in the target's folder, then a
rename), so a reader, or a run that was killed, sees the old file or the whole new one; and checks
each output path with ``check_output_path`` before any work is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from bwacal.errors import BwacalError

JSON_SCHEMA = 1
"""Version of every JSON document bwacal prints or writes (``"schema": 1``): accuracies, agreements
and drops are fractions (0.9175 is 91.75%); ``--max-drop`` and the like stay in points on the
command line."""


@contextlib.contextmanager
def write_atomically(path):
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path`` (with the usual
    file mode), on any exception it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomically(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    with write_atomically(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_path(path, inputs=(), force: bool = True, what: str = "output") -> Path:
    """Refuse, before any work, an output ``path`` that is one of ``inputs``, a directory, in a
    folder that is missing or not writable, or (without ``force``) an existing file."""
    path = Path(path)
    for p in inputs:
        if p is not None and Path(p).exists() and path.exists() and path.resolve() == Path(p).resolve():
            raise BwacalError(f"{path}: the {what} would overwrite the input file {p}; choose another path")
    if path.is_dir():
        raise BwacalError(f"{path}: is a directory; the {what} must be a file name")
    parent = path.parent
    if not parent.is_dir():
        raise BwacalError(f"{path}: the {what} folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BwacalError(f"{path}: the {what} folder {parent} is not writable")
    if path.exists() and not force:
        raise BwacalError(f"{path}: already exists; pass --force to overwrite it")
    return path
