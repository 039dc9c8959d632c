"""The small files a second home needs as much as this one (the ssh provider's host claims,
pinned host keys, proxy-command trust, the controller's back-off, a cluster's keys): files in
$MLCLOUD_HOME, or on a shared store rows of its `docs` table under the same relative names.

`exclusive()` is every read-modify-write: a file lock in the home, or one store transaction
(writers take turns there), so a host is claimed exactly once across homes. A process shares
one store connection for these, its threads taking turns (docs/architecture.md, "Where state
lives").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mlcloud import state
from mlcloud.state import paths

_lock = threading.RLock()
_shared: dict[str, state.Store] = {}  # url -> this process's connection for docs


def _store() -> state.Store | None:
    """The shared store's connection, or None when state is SQLite in the home."""
    url = state.state_url()
    if not url:
        return None
    with _lock:
        if url not in _shared:
            _shared[url] = state.open_store()
        return _shared[url]


def shared() -> bool:
    return state.state_url() is not None


def where(rel: str) -> str:
    """It as a person finds it: the file's path, or its name on the shared store."""
    store = _store()
    return str(paths.home() / rel) if store is None else f"{rel} on {store.where()}"


def salt() -> bytes:
    """The shared store's salt for sealing keys (mlcloud/state/sealed.py)."""
    store = _store()
    assert store is not None, "only a shared store seals"
    with _lock:
        return store.salt()


def read(rel: str) -> bytes | None:
    store = _store()
    if store is None:
        try:
            return (paths.home() / rel).read_bytes()
        except FileNotFoundError:
            return None
    with _lock:
        return store.get_doc(rel)


def write(rel: str, data: bytes) -> None:
    """Replace it whole (atomically: a temporary file renamed over it, 0600, in a private
    directory; or one row)."""
    store = _store()
    if store is None:
        from mlcloud.state import atomic

        path = paths.home() / rel
        paths.private_dir(path.parent)
        atomic.write(path, data)
        return
    with _lock:
        store.put_doc(rel, data)


def create(rel: str, data: bytes) -> bytes:
    """Write it unless it exists; what is there afterwards (the first writer's, of racers)."""
    store = _store()
    if store is None:
        import os

        path = paths.home() / rel
        paths.private_dir(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return data
    with _lock:
        return store.create_doc(rel, data)


def remove(rel: str) -> None:
    store = _store()
    if store is None:
        (paths.home() / rel).unlink(missing_ok=True)
        return
    with _lock:
        store.delete_doc(rel)


def listing(folder: str, suffix: str) -> list[tuple[str, float]]:
    """(name without the suffix, when last written) of what lies in a folder, sorted."""
    store = _store()
    if store is None:
        d = paths.home() / folder
        found = sorted(d.glob(f"*{suffix}")) if d.is_dir() else []
        return [(f.name.removesuffix(suffix), f.stat().st_mtime) for f in found]
    with _lock:
        return [
            (name[len(folder) + 1 :].removesuffix(suffix), at)
            for name, at in store.doc_names(f"{folder}/")
            if name.endswith(suffix) and "/" not in name[len(folder) + 1 :]
        ]


@contextmanager
def exclusive(lock_rel: str) -> Iterator[None]:
    """One read-modify-write at a time, whichever process or home: the file lock lock_rel in
    the home, or one transaction of the shared store (this thread's reads and writes in it)."""
    store = _store()
    if store is None:
        from filelock import FileLock

        path = paths.home() / lock_rel
        paths.private_dir(path.parent)
        with _lock, FileLock(str(path), mode=0o600):
            yield
        return
    with _lock, store.tx():
        yield
