"""Files coming home from a node (`mlcloud pull`), trusting nothing the node says.

Two round trips: the node's sender (templates/send.py) lists its files, then streams those
that changed since the last pull. A node may be compromised, or run a job that plants traps,
so before a byte is written here:
- every path must be relative and plain (no `..`, no absolute path, no NUL) and listed once;
  one bad path refuses the whole node, and nothing of it is written;
- the total to receive must fit the size cap, checked from the listing and again per file
  while streaming (a file must be sent at the size it was listed at), so a node that lies
  about a 100 GB file is refused after one header line, not after 100 GB;
- only regular files can be expressed, and none is written through a symlink: the writer is
  the one a node's receiver uses (templates/receive.py `Tree`: directory descriptors opened
  with O_NOFOLLOW, a fresh temporary renamed over the target), so pull never creates a
  symlink and never follows one, planted or the user's;
- a file's mode is never the node's: 0755 if it was an ordinary executable (owner exec bit,
  no set-uid, set-gid or sticky bit, not world-writable), else 0644; a file others could
  not read on the node (0600, 0700) is 0600 or 0700 here.
Files already here are never deleted: a node whose disk was emptied leaves the results alone.
One deleted or cut short here since the last pull comes again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mlcloud.errors import LocalWriteError, MlcloudError, UsageError
from mlcloud.parallel import Cancelled, cancelled
from mlcloud.remote.shell import STDLIB_PY, quote
from mlcloud.remote.sync import MANIFEST, Entry, Manifest, dump, human, load
from mlcloud.remote.transport import RemoteError, Transport
from mlcloud.templates.receive import Failed, Tree, is_tmp
from mlcloud.templates.receive import Refused as Unsafe

CHUNK = 1 << 20
MAX_LINE = 1 << 16  # one frame header
MAX_LISTING = 256 << 20  # a node's whole listing
MAX_FILES = 1_000_000


class Progress(Protocol):
    def start(self, total: int) -> None:
        """The bytes this node will send."""

    def advance(self, n: int) -> None: ...


@dataclass(frozen=True)
class Fetched:
    files: int  # written this time
    bytes: int  # received from the node, listing and frames
    unchanged: int  # listed, and already here
    skipped: tuple[str, ...]  # what the node holds that cannot travel (symlinks, devices)
    gone: tuple[str, ...]  # listed, then deleted on the node before it was sent
    checkpoint: str | None  # the newest complete checkpoint's name, when asked for


class _Writing:
    """How many files pulls are writing now, in any thread: an interrupted pull waits for its
    workers to remove their temporaries (they stop between blocks), not for slow listings."""

    def __init__(self) -> None:
        self.cond, self.count = threading.Condition(), 0

    def begin(self) -> None:
        with self.cond:
            self.count += 1

    def end(self) -> None:
        with self.cond:
            self.count -= 1
            self.cond.notify_all()

    def __enter__(self) -> None:
        self.begin()

    def __exit__(self, *exc) -> None:
        self.end()

    def settle(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.count == 0, timeout=timeout)


WRITING = _Writing()


class Refused(MlcloudError):
    """The node sent something a pull must not write."""


class Blocked(Refused, LocalWriteError):
    """What is in dest stands in the way (a symlink, a directory where a file goes)."""


@dataclass(frozen=True)
class _File:
    size: int
    mtime_ns: int | None
    digest: str
    mode: int


def fetch(
    transport: Transport,
    request: dict,
    dest: Path,
    cap: int,
    progress: Progress | None = None,
) -> Fetched:
    """Bring what `request` names on the node (templates/send.py) into dest, sending only
    what changed since the last pull into dest."""
    label = transport.label
    with _local(label, dest):
        tree = Tree(str(dest))
    received = 0
    written = 0
    writing = False  # from the listing on: the files, then the manifest
    ok = False
    have: Manifest | None = None
    try:
        with _local(label, dest):
            have = _present(dest, load(tree.read(MANIFEST) or b"{}"))
        listed, received = _listing(transport, request, have)
        WRITING.begin()
        writing = True
        if cancelled():  # counted first, then asked: a settling pull sees one or the other
            raise Cancelled()
        files: dict[str, _File] = listed["files"]
        want = [p for p, f in files.items() if p not in have or have[p].digest != f.digest]
        for p, f in files.items():  # the same bytes, touched: remember the node's new mtime
            if p not in want and f.mtime_ns is not None:
                have[p] = Entry(f.size, f.mtime_ns, have[p].digest)
        total = sum(files[p].size for p in want)
        with _local(label, dest):
            _check_room(label, dest, want, files, have, total, cap)
        gone: list[str] = []
        if want:
            if progress is not None:
                progress.start(total)
            ask = {**request, "checkpoint": listed["checkpoint"]}
            with _local(label, dest, disk_only=False):
                sent, written = _receive(transport, ask, tree, want, files, have, cap, progress)
            received += sent.received
            gone = sent.gone
        ok = True
    finally:
        # counted, then asked: an interrupted pull waits for this write too (the process would
        # exit with its temporary left), and one interrupted while listing changed nothing
        if not writing:
            WRITING.begin()
        try:
            if have is not None and (writing or not cancelled()):
                try:
                    with _local(label, dest):
                        tree.write(MANIFEST, [dump(have)], 0o644)
                except MlcloudError:
                    # after another failure, that one is the cause to tell; the next pull
                    # sends again whatever the manifest could not record
                    if ok:
                        raise
        finally:
            tree.close()
            WRITING.end()
    return Fetched(
        files=written,
        bytes=received,
        unchanged=len(files) - len(want),
        skipped=listed["skipped"],
        gone=tuple(gone),
        checkpoint=listed["checkpoint"],
    )


# what a refused local write means, and what to do about it
_HINTS = {
    errno.EROFS: "it is on a read-only file system: pull somewhere else (DEST)",
    errno.ENOSPC: "the disk is full: free space there or pull somewhere else (DEST)",
    errno.EDQUOT: "the disk quota is used up: free space or pull somewhere else (DEST)",
    errno.EACCES: "check its permissions, or pull somewhere else (DEST)",
    errno.EPERM: "check its permissions, or pull somewhere else (DEST)",
    errno.ENOTDIR: "a file stands where a directory should be: move it aside or pull elsewhere",
    errno.EEXIST: "something is in the way: move it aside or pull somewhere else (DEST)",
    errno.ENAMETOOLONG: "a name is too long for that file system: pull somewhere else (DEST)",
}


@contextlib.contextmanager
def _local(label: str, dest: Path, disk_only: bool = True) -> Iterator[None]:
    """This machine's refusals while writing into dest, as one line naming dest and why. Where
    the node's stream is read too (not disk_only), an OSError is the transport's: it passes
    (the writer turns its own into Failed)."""
    try:
        yield
    except Unsafe as e:  # worded for a node's receiver: here the place is dest
        why = str(e).replace(" on the node", f" in {dest}").replace(" there", "")
        raise Blocked(f"{label}: refused to write into {dest}: {why}") from None
    except Failed as e:
        hint = _HINTS.get(e.errno)
        raise LocalWriteError(
            f"{label}: cannot write into {dest}: {e}" + (f"; {hint}" if hint else "")
        ) from None
    except OSError as e:
        if not disk_only:
            raise
        where = f"{e.filename}: " if isinstance(e.filename, str) and e.filename != str(dest) else ""
        hint = _HINTS.get(e.errno)
        raise LocalWriteError(
            f"{label}: cannot write into {dest}: {where}{e.strerror or e}"
            + (f"; {hint}" if hint else "")
        ) from None


def _present(dest: Path, have: Manifest) -> Manifest:
    """The record of earlier pulls, less what is no longer here as it was written (deleted,
    cut short or replaced since): that comes again. A look, never a write: a symlink on the
    way only makes a file come again, and the write refuses it."""
    kept = {}
    for path, entry in have.items():
        try:
            st = os.lstat(dest / path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
            kept[path] = entry
    return kept


def _command(transport: Transport) -> str:
    from mlcloud import templates

    sender = templates.path("send.py").read_text()
    return f"{quote(transport.python)} {STDLIB_PY} -c {quote(sender)}"


class _Reader:
    """The node's stdout with bounded lines and exact-length bodies, counting every byte."""

    def __init__(self, pipe):
        self.pipe, self.buf, self.received = pipe, bytearray(), 0

    def _fill(self) -> None:
        data = self.pipe.read(CHUNK)
        if not data:
            raise _Truncated()
        self.received += len(data)
        self.buf += data

    def line(self, limit: int = MAX_LINE) -> bytes:
        start = 0
        while True:
            end = self.buf.find(b"\n", start)
            if end >= 0:
                out = bytes(self.buf[:end])
                del self.buf[: end + 1]
                return out
            if len(self.buf) > limit:
                raise Refused(f"a header line longer than {human(limit)}: not a pull stream")
            start = len(self.buf)
            self._fill()

    def body(self, n: int) -> Iterator[bytes]:
        while n:
            if not self.buf:
                self._fill()
            take = min(n, len(self.buf), CHUNK)
            out = bytes(self.buf[:take])
            del self.buf[:take]
            n -= take
            yield out


class _Truncated(Exception):
    """The node's output ended early."""


def _ask(transport: Transport, request: dict):
    return transport.stream(_command(transport), json.dumps(request).encode())


def _ended(transport: Transport, pipe, what: str) -> None:
    result = pipe.finish()
    if result.exit_code != 0:
        detail = result.stderr.strip().splitlines()
        raise RemoteError(
            f"{transport.label}: {what} failed with exit code {result.exit_code}"
            + (f": {detail[-1]}" if detail else "")
        )


def _listing(transport: Transport, request: dict, have: Manifest) -> tuple[dict, int]:
    """The node's files, each checked; (listing, bytes received)."""
    ask = {**request, "mode": "list", "have": json.loads(dump(have))}
    with _ask(transport, ask) as pipe:
        reader = _Reader(pipe)
        try:
            raw = reader.line(MAX_LISTING)
        except _Truncated:
            _ended(transport, pipe, "listing the outputs")
            raise Refused(f"{transport.label}: the node's listing ended early") from None
        _ended(transport, pipe, "listing the outputs")
    return _checked_listing(transport.label, raw), reader.received


def _checked_listing(label: str, raw: bytes) -> dict:
    def bad(why: str) -> Refused:
        return Refused(f"{label}: refused the node's listing: {why}; nothing was written")

    try:
        doc = json.loads(raw)
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise bad("no file list")
    if len(doc["files"]) > MAX_FILES:
        raise bad(f"more than {MAX_FILES:,} files")
    files: dict[str, _File] = {}
    for item in doc["files"]:
        if not (isinstance(item, list) and len(item) == 5):
            raise bad(f"a malformed entry {item!r:.80}")
        path, size, mtime, digest, mode = item
        _check_path(path, bad)
        if path in files:
            raise bad(f"{path!r} listed twice")
        if not (_is_int(size) and size >= 0 and _is_int(mode) and 0 <= mode <= 0o7777):
            raise bad(f"{path!r} has a bad size or mode")
        if not isinstance(digest, str) or len(digest) > 128:
            raise bad(f"{path!r} has a bad digest")
        ok_time = _is_int(mtime) and 0 <= mtime < 1 << 62
        files[path] = _File(size, mtime if ok_time else None, digest, mode)
    dirs = {p[:i] for p in files for i, c in enumerate(p) if c == "/"}
    clash = next((p for p in files if p in dirs), None)
    if clash is not None:
        raise bad(f"{clash!r} is listed as a file and as a directory")
    skipped = doc.get("skipped") or []
    checkpoint = doc.get("checkpoint")
    if not isinstance(skipped, list) or not all(isinstance(s, str) for s in skipped):
        raise bad("a malformed list of skipped files")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise bad("a malformed checkpoint name")
    return {"files": files, "skipped": tuple(skipped), "checkpoint": checkpoint}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_path(path: object, bad) -> None:
    """Relative, plain, and none of the names a pull keeps for itself."""
    if not isinstance(path, str) or not path or len(path) > 4096:
        raise bad(f"an unsafe path {path!r:.80}")
    parts = path.split("/")
    if (
        path.startswith("/")
        or "\0" in path
        or {"", ".", ".."} & set(parts)
        or any(len(p.encode(errors="surrogateescape")) > 255 for p in parts)
        or path == MANIFEST
        or is_tmp(path)
    ):
        raise bad(f"an unsafe path {path!r:.200} (absolute, `..`, or a name pull keeps)")


def _check_room(
    label: str,
    dest: Path,
    want: list[str],
    files: dict[str, _File],
    have: Manifest,
    total: int,
    cap: int,
) -> None:
    """Refuse before a byte travels what cannot fit: over the cap, or over the free space
    (each file in whole blocks, and the manifest written after them)."""
    if total > cap:
        big = max(want, key=lambda p: files[p].size)
        raise UsageError(
            f"{label}: {human(total)} to pull is over the limit of {human(cap)} ({big} alone "
            f"is {human(files[big].size)}); raise it with --max-size, or pull one node at a "
            "time with --node"
        )
    fs = os.statvfs(dest)
    block = fs.f_frsize or 4096
    manifest = {**have, **{p: Entry(files[p].size, 1 << 62, "0" * 32) for p in want}}
    sizes = [files[p].size for p in want] + [len(dump(manifest))]
    need = sum(-(-n // block) * block for n in sizes)
    free = fs.f_bavail * block
    if need > free:
        raise LocalWriteError(
            f"{label}: {human(need)} to write into {dest} and only {human(free)} free there; "
            "free space there or pull somewhere else (DEST)"
        )


@dataclass
class _Sent:
    received: int
    gone: list[str]


def _receive(
    transport: Transport,
    request: dict,
    tree,
    want: list[str],
    files: dict[str, _File],
    have: Manifest,
    cap: int,
    progress: Progress | None,
) -> tuple[_Sent, int]:
    """Stream the wanted files into tree; have gains each one as it lands."""
    label = transport.label
    pending = set(want)
    gone: list[str] = []
    written = body_bytes = 0
    with _ask(transport, {**request, "mode": "send", "paths": want}) as pipe:
        reader = _Reader(pipe)
        try:
            while True:
                meta = _frame(label, reader.line())
                if "end" in meta:
                    break
                path = meta["p"]
                if path not in pending:
                    raise Refused(f"{label}: the node sent {path!r:.200}, which was not asked for")
                pending.discard(path)
                if meta.get("gone"):
                    gone.append(path)
                    continue
                f = files[path]
                n = meta["n"]
                if n != f.size:
                    raise Refused(
                        f"{label}: {path} was listed at {f.size:,} bytes and sent at {n:,}: it "
                        "changed on the node (or the node lies); pull again once the job has "
                        "stopped writing it"
                    )
                if body_bytes + n > cap:
                    raise Refused(f"{label}: the node sent more than the limit of {human(cap)}")
                body_bytes += n
                h = hashlib.blake2b(digest_size=16)
                chunks = _verified(reader, n, h, f, path, label, progress)
                with WRITING:
                    if cancelled():  # interrupted: no new temporary once the pull settles
                        raise Cancelled()
                    tree.write(path, chunks, _mode(f), f.mtime_ns)
                have[path] = Entry(f.size, f.mtime_ns or 0, h.hexdigest())
                written += 1
        except _Truncated:
            _ended(transport, pipe, "sending the outputs")
            raise Refused(f"{label}: the node's stream ended early") from None
        if pending:
            raise Refused(f"{label}: the node did not send {sorted(pending)[0]!r:.200}")
        _ended(transport, pipe, "sending the outputs")
    return _Sent(reader.received, gone), written


def _frame(label: str, raw: bytes) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    ok = isinstance(meta, dict) and (
        (set(meta) == {"end"} and _is_int(meta["end"]))
        or (set(meta) == {"p", "gone"} and meta["gone"] is True)
        or (set(meta) == {"p", "n", "m"} and _is_int(meta["n"]) and meta["n"] >= 0)
    )
    if not ok:
        raise Refused(f"{label}: not a pull stream (a frame {raw[:80]!r})")
    return meta


def _verified(reader: _Reader, n: int, h, f: _File, path: str, label: str, progress):
    """The file's bytes, hashed on the way; a digest other than the one listed (when the node
    listed one) refuses the file before it takes its name. An interrupted pull stops between
    blocks, so the writer removes its temporary."""
    for block in reader.body(n):
        if cancelled():
            raise Cancelled()
        h.update(block)
        if progress is not None:
            progress.advance(len(block))
        yield block
    if f.digest and h.hexdigest() != f.digest:
        raise Refused(f"{label}: {path} arrived with other content than listed; pull again")


def _mode(f: _File) -> int:
    ordinary_exec = f.mode & 0o100 and not f.mode & 0o7002
    mode = 0o755 if ordinary_exec else 0o644
    return mode if f.mode & 0o044 else mode & 0o700  # private on the node, private here
