"""Workdir sync by manifest: (path, size, mtime, content hash) per file, so a re-sync sends only
what changed and deletes what was deleted. Ignore rules: .gitignore and .mlcloudignore at the
workdir's root, plus a few directories nobody wants shipped."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlcloud.errors import UsageError
from mlcloud.remote.transport import SyncStats

MANIFEST = ".mlcloud-manifest.json"
ALWAYS_IGNORED = [".git/", "__pycache__/", "*.pyc", ".venv/", ".mlcloud/", MANIFEST]


@dataclass(frozen=True)
class Entry:
    size: int
    mtime_ns: int
    digest: str


Manifest = dict[str, Entry]


def _ignore_spec(root: Path):
    import pathspec

    lines = list(ALWAYS_IGNORED)
    for name in (".gitignore", ".mlcloudignore"):
        f = root / name
        if f.is_file():
            lines += f.read_text(errors="replace").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan(root: Path, previous: Manifest | None = None) -> Manifest:
    """Manifest of the files to ship; hashes are reused from `previous` when size and mtime match.

    Symlinks are shipped as the files they point to when those lie inside root, and refused
    otherwise: a link out of the workdir would copy (or expose) files the user never meant to send.
    """
    if not root.is_dir():
        raise UsageError(f"workdir {root} is not a directory")
    out: Manifest = {}
    _walk(str(root), "", _ignore_spec(root), previous or {}, out, root.resolve())
    return out


def _walk(
    root: str, rel_dir: str, spec, previous: Manifest, out: Manifest, real_root: Path
) -> None:
    """Depth first in name order with os.scandir: one stat per file, reused from the entry."""
    with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        rel = rel_dir + e.name
        if e.is_dir(follow_symlinks=False):
            if not spec.match_file(rel + "/"):
                _walk(root, rel + "/", spec, previous, out, real_root)
            continue
        if spec.match_file(rel):
            continue
        if e.is_symlink():
            target = Path(e.path).resolve()
            if not target.is_relative_to(real_root):
                raise UsageError(
                    f"workdir {root}: {rel} is a symlink to {target}, outside the workdir; "
                    "remove it or add it to .mlcloudignore"
                )
            if not target.is_file():
                continue
            st = os.stat(e.path)
        elif e.is_file(follow_symlinks=False):
            st = e.stat(follow_symlinks=False)
        else:
            continue
        old = previous.get(rel)
        if old and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            out[rel] = old
        else:
            out[rel] = Entry(st.st_size, st.st_mtime_ns, _digest(Path(e.path)))


def diff(local: Manifest, remote: Manifest) -> tuple[list[str], list[str]]:
    """(paths to send, paths to delete) to turn remote into local."""
    send = [p for p, e in local.items() if remote.get(p) is None or remote[p].digest != e.digest]
    delete = [p for p in remote if p not in local]
    return send, delete


def dump(manifest: Manifest) -> bytes:
    return json.dumps({p: [e.size, e.mtime_ns, e.digest] for p, e in manifest.items()}).encode()


def load(data: bytes) -> Manifest:
    try:
        raw = json.loads(data)
        return {p: Entry(*v) for p, v in raw.items()}
    except (ValueError, TypeError):
        return {}


def local_sync(src: Path, dest: Path) -> SyncStats:
    """Mirror src into dest on this machine, copying only what changed since the last sync."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / MANIFEST
    remote = load(manifest_path.read_bytes()) if manifest_path.exists() else {}
    local = scan(src)
    send, delete = diff(local, remote)
    sent_bytes = 0
    for rel in send:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
        sent_bytes += local[rel].size
    for rel in delete:
        (dest / rel).unlink(missing_ok=True)
    manifest_path.write_bytes(dump(local))
    return SyncStats(len(send), sent_bytes, len(delete))


def pack(src: Path, send: list[str], delete: list[str], manifest: Manifest) -> bytes:
    """One stream for a node: a JSON header line ({"delete", "manifest"}), then per file a JSON
    line ({"p": path, "n": bytes that follow, "z": zlib?, "x": executable?}) and its bytes,
    then {"end": count}.

    A file is compressed (zlib level 1, on all cores: zlib releases the GIL) only when a sample
    of it compresses; random weights and images go as they are, where tar.gz spent most of
    its time compressing what does not compress."""
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    def frame(rel: str) -> bytes:
        path = src / rel
        data = path.read_bytes()
        sample = data[:65536]
        z = len(data) > 256 and len(zlib.compress(sample, 1)) < 0.9 * len(sample)
        if z:
            data = zlib.compress(data, 1)
        meta = {"p": rel, "n": len(data), "z": z, "x": bool(path.stat().st_mode & 0o111)}
        return json.dumps(meta).encode() + b"\n" + data

    header = {
        "delete": delete,
        "manifest": {p: [e.size, e.mtime_ns, e.digest] for p, e in manifest.items()},
    }
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        frames = list(pool.map(frame, send))
    end = json.dumps({"end": len(send)}).encode() + b"\n"
    return b"".join([json.dumps(header).encode() + b"\n", *frames, end])


_scans: dict[str, tuple[float, Manifest]] = {}
_scan_lock = threading.Lock()


def _scan_once(src: Path, previous: Manifest) -> Manifest:
    """Nodes synced side by side share one scan: a caller that waited while another scanned
    takes that result, since it began after the caller asked."""
    asked = time.monotonic()
    with _scan_lock:
        hit = _scans.get(str(src))
        if hit is not None and hit[0] >= asked:
            return hit[1]
        started = time.monotonic()
        manifest = scan(src, previous=previous)
        _scans[str(src)] = (started, manifest)
        return manifest


_packs: dict[tuple, bytes] = {}
_packs_lock = threading.Lock()


def push(transport, src: Path, remote_dir: str) -> SyncStats:
    """Sync src to remote_dir over a transport that can run a command with stdin.

    Nodes in the same state get the same stream, built once per process."""
    import shlex

    from mlcloud import templates
    from mlcloud.remote.transport import check

    remote = load(transport.get(f"{remote_dir}/{MANIFEST}") or b"{}")
    local = _scan_once(src, remote)
    send, delete = diff(local, remote)
    if not send and not delete:
        return SyncStats(0, 0, 0)
    key = (str(src), tuple(send), tuple(delete), dump(local))
    with _packs_lock:
        payload = _packs.get(key)
        if payload is None:
            _packs.clear()  # keep one stream: enough for nodes synced side by side
            payload = _packs[key] = pack(src, send, delete, local)
    receiver = templates.path("receive.py").read_text()
    # -I -S: the receiver needs only the standard library; skipping site saves ~40 ms a node
    cmd = (
        f"{shlex.quote(transport.python)} -I -S -c {shlex.quote(receiver)} "
        f"{shlex.quote(remote_dir)}"
    )
    check(transport.run(cmd, stdin=payload), transport, "syncing the workdir")
    return SyncStats(len(send), sum(local[p].size for p in send), len(delete))
