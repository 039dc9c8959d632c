"""Files that a kill or a power cut leaves either old or new, never half written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path, mode: int = 0o600) -> Iterator[Path]:
    """Yield a temp file beside path (already `mode`) to fill; once the block ends it is
    synced and renamed over path, and the rename itself synced. On error path is untouched."""
    # a short name of its own: path's whole name plus a suffix may pass the 255-byte limit
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.")
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e.filename, str):  # a write's: no path
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write(path: Path, data: bytes, mode: int = 0o600) -> None:
    with replacing(path, mode) as tmp:
        tmp.write_bytes(data)
