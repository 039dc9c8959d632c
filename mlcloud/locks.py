"""One lock per cluster, so two commands never provision or tear down the same cluster at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mlcloud.errors import BusyError


@contextmanager
def cluster_lock(name: str, timeout: float = 30.0) -> Iterator[None]:
    from filelock import FileLock, Timeout

    from mlcloud import paths

    lock = FileLock(str(paths.locks_dir() / f"{name}.lock"), mode=0o600)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise BusyError(
            f"cluster {name!r} is busy: another mlcloud command (up, down or a job launch) "
            f"held its lock for {timeout:.0f}s; retry when it finishes"
        ) from None
    try:
        yield
    finally:
        lock.release()
