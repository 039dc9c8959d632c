"""Node side of a workdir sync: apply one stream from stdin into DEST.

Run as `python3 -I -S -c <this file> DEST`; standard library only. The stream (built by
mlcloud/remote/sync.py `pack`) is a JSON header line ({"delete": [...], "manifest": {...}}),
then per file a JSON line ({"p": path, "n": size, "z": zlib?, "x": executable?}) and its
bytes, then {"end": count}. Only regular files can be expressed; a path that is absolute or
has `..` is refused before anything is written or deleted. A stream whose first line is
{"codec": "zstd"} is that stream compressed as one zstd frame, which the client sends only to
a node whose Python decodes zstd (compression.zstd from 3.14, or the zstandard module).

Whatever the job left in DEST is distrusted: everything below DEST is reached through
directory descriptors opened with O_NOFOLLOW, so a symlinked directory is refused rather
than followed, and each file is written to a fresh temporary (O_CREAT|O_EXCL|O_NOFOLLOW)
renamed over its target, so a planted symlink is replaced, never written through. A sync
that fails (a truncated stream, a full disk, a signal) removes the file it was writing; the
manifest is written only at the end, so the next sync sends again whatever did not arrive.

The local provider's sync (mlcloud/remote/sync.py `local_sync`) imports `Tree` from here, so
both write the same way.
"""

import errno
import hashlib
import json
import os
import signal
import stat
import sys
import zlib

MANIFEST = ".mlcloud-manifest.json"
TMP_SUFFIX = ".mlcloud-tmp"  # a temporary's name: the target's plus this, where it fits
TMP_PREFIX = ".mlcloud-tmp."  # else one of its own, so any name the file system allows fits
NAME_MAX = 255
CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def tmp_name(base):
    """The temporary a file is written to before it takes base's name: base plus a suffix
    where that fits the file system's 255-byte limit, else a short name of its own; the same
    each time, so what a killed write left is found and removed."""
    raw = base.encode(errors="surrogateescape")
    if len(raw) + len(TMP_SUFFIX) <= NAME_MAX:
        return base + TMP_SUFFIX
    return TMP_PREFIX + hashlib.blake2b(raw, digest_size=8).hexdigest()


def is_tmp(name):
    """Whether a path's last part is one of the writers' temporaries."""
    last = name.rpartition("/")[2]
    return last.endswith(TMP_SUFFIX) or last.startswith(TMP_PREFIX)


class Refused(Exception):
    """The stream or the destination is not something a sync may write."""


class Failed(Exception):
    """The node could not take a file (a full disk, a read-only file system, a quota)."""

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno  # the OSError's, for the client's hint (mlcloud/remote/fetch.py)


class Tree:
    """DEST and the files below it, reached only through directory descriptors."""

    def __init__(self, dest):
        self.dest = dest
        os.makedirs(dest, exist_ok=True)
        try:
            self.fd = os.open(dest, _DIR)
        except OSError as e:  # ELOOP: the workdir itself was swapped for a symlink
            raise Refused(f"{dest} is not a plain directory ({e.strerror})") from None
        self._parent = ("", self.fd)  # the last directory used: files arrive sorted by path

    def close(self):
        self._drop_parent()
        os.close(self.fd)

    def _drop_parent(self):
        if self._parent[1] != self.fd:
            os.close(self._parent[1])
        self._parent = ("", self.fd)

    def _split(self, name):
        parts = name.split("/") if isinstance(name, str) else [""]
        if not name or name.startswith("/") or "\0" in name or {"", ".", ".."} & set(parts):
            raise Refused(f"unsafe path {name!r}")
        return parts[:-1], parts[-1]

    def _dir(self, name, create):
        """(fd of name's directory, base name); None when it does not exist and not create."""
        dirs, base = self._split(name)
        rel = "/".join(dirs)
        if self._parent[0] == rel:
            return self._parent[1], base
        self._drop_parent()
        fd = self.fd
        try:
            for i, part in enumerate(dirs):
                try:
                    nxt = os.open(part, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        if fd != self.fd:
                            os.close(fd)
                        return None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, _DIR, dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):  # a symlink, a file
                        raise
                    where = "/".join(dirs[: i + 1])
                    kind = "a symlink" if os.path.islink(os.path.join(self.dest, where)) else ""
                    raise Refused(
                        f"{name!r}: {where!r} on the node is {kind or 'not a directory'} "
                        f"({e.strerror}); remove it there"
                    ) from None
                if fd != self.fd:
                    os.close(fd)
                fd = nxt
        except BaseException:
            if fd != self.fd:
                os.close(fd)
            raise
        self._parent = (rel, fd)
        return fd, base

    def read(self, name):
        """A file's bytes, or None; a symlink counts as missing."""
        f = self.open(name)
        if f is None:
            return None
        with f:
            return f.read()

    def open(self, name):
        """A file opened for reading, or None; a symlink counts as missing."""
        found = self._dir(name, create=False)
        if found is None:
            return None
        try:
            fd = os.open(found[1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=found[0])
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory in its place: missing too
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def delete(self, name):
        """Remove a file (or the symlink in its place); a directory there is left alone."""
        try:
            found = self._dir(name, create=False)
            if found is not None:
                os.unlink(found[1], dir_fd=found[0])
        except (FileNotFoundError, IsADirectoryError):
            pass
        except OSError as e:
            raise Failed(f"deleting {name!r}: {e.strerror}", e.errno) from None

    def write(self, name, chunks, mode, mtime_ns=None):
        """Write chunks (an iterable of bytes) to name atomically: a fresh temporary, renamed.

        On any failure, the temporary is removed before the error goes on."""
        try:
            self._write(name, chunks, mode, mtime_ns)
        except OSError as e:
            raise Failed(f"writing {name!r:.120}: {e.strerror}", e.errno) from None

    def _write(self, name, chunks, mode, mtime_ns):
        dirfd, base = self._dir(name, create=True)
        tmp = tmp_name(base)
        shown = name[: len(name) - len(base)] + tmp
        try:
            os.unlink(tmp, dir_fd=dirfd)  # what a killed sync left behind
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.EPERM):  # not a file: read-only, I/O
                raise
            raise Refused(
                f"{shown!r} (the temporary for {name!r:.80}) is in the way on the node "
                f"({e.strerror}); remove it there"
            ) from None
        try:
            fd = os.open(tmp, _NEW, 0o600, dir_fd=dirfd)
        except FileExistsError:
            raise Refused(f"{shown!r} reappeared on the node while syncing") from None
        try:
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)
            try:
                os.replace(tmp, base, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except IsADirectoryError:  # a directory where the file now goes: empty it may go
                try:
                    os.rmdir(base, dir_fd=dirfd)
                except OSError:
                    raise Refused(f"{name!r} is a directory on the node; remove it there") from None
                os.replace(tmp, base, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dirfd)
            except OSError:
                pass
            raise


class Stream:
    """stdin read with os.read, one system call per read, so a signal that arrives while the
    sender stalls interrupts the read (a BufferedReader goes on filling its buffer and stays
    blocked with the signal pending)."""

    def __init__(self, fd):
        self.fd, self.buf, self.pos = fd, b"", 0

    def readline(self):
        while True:
            end = self.buf.find(b"\n", self.pos)
            if end >= 0:
                line, self.pos = self.buf[self.pos : end + 1], end + 1
                return line
            data = self._read(CHUNK)
            if not data:
                line, self.buf, self.pos = self.buf[self.pos :], b"", 0
                return line
            self.buf, self.pos = self.buf[self.pos :] + data, 0

    def _read(self, n):
        return os.read(self.fd, n)

    def read(self, n):
        """Up to n bytes, fewer when fewer have arrived; b"" at the end of the stream."""
        if self.pos == len(self.buf):
            self.buf, self.pos = self._read(max(n, CHUNK)), 0
        out = self.buf[self.pos : self.pos + n]  # all of buf: the same object, not a copy
        self.pos += len(out)
        return out


class Unzstd(Stream):
    """What follows {"codec": "zstd"} in a stream, decoded; a piece may be larger than asked."""

    def __init__(self, raw):
        super().__init__(None)
        self.raw, self.decoder = raw, _zstd()

    def _read(self, n):
        while True:
            block = self.raw.read(n)
            if not block:
                return b""  # cut short: the frame it was reading reports a truncated stream
            try:
                out = self.decoder.decompress(block)
            except Exception:  # zstandard.ZstdError, compression.zstd.ZstdError, EOFError
                raise Refused("corrupt compressed data") from None
            if out:
                return out


def _zstd():
    """A zstd decoder from this Python: compression.zstd (3.14), else the zstandard module.
    Run with -S, site-packages is searched only now, when a stream asks for zstd."""
    try:
        from compression import zstd
    except ImportError:
        if sys.flags.no_site:
            import site

            site.main()
        try:
            import zstandard
        except ImportError:
            raise Refused("the stream is zstd and this Python cannot decode it") from None
        return zstandard.ZstdDecompressor().decompressobj()
    return zstd.ZstdDecompressor()


def _frame_chunks(stdin, size, compressed):
    """A file's bytes from the stream, a chunk at a time; Refused if the stream breaks off."""
    inflate = zlib.decompressobj() if compressed else None
    left = size
    while left:
        block = stdin.read(min(CHUNK, left))
        if not block:
            raise Refused("truncated stream")
        left -= len(block)
        if inflate is not None:
            try:
                block = inflate.decompress(block)
            except zlib.error:
                raise Refused("corrupt compressed data") from None
        yield block
    if inflate is not None:
        yield inflate.flush()


def file_frame(f, name):
    """One file of a stream as receive() reads it, uncompressed: its line, then its bytes as
    they are read; Failed if it is cut short meanwhile. Written here so that the client's zstd
    stream (mlcloud/remote/sync.py) and the relay (fanout.py) send files alike."""
    st = os.fstat(f.fileno())
    meta = {"p": name, "n": st.st_size, "z": False, "x": bool(st.st_mode & 0o111)}
    yield json.dumps(meta).encode() + b"\n"
    left = st.st_size
    while left:
        block = f.read(min(CHUNK, left))
        if not block:
            raise Failed(f"{name!r} shrank while it was read")
        left -= len(block)
        yield block


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwind, so the file being written is removed


def _line(stdin):
    try:
        value = json.loads(stdin.readline() or "{}")
    except ValueError:
        raise Refused("not a sync stream") from None
    if not isinstance(value, dict):
        raise Refused("not a sync stream")
    return value


def receive(tree, stdin):
    """Apply one stream to tree; returns the number of files written."""
    header = _line(stdin)
    if "codec" in header:
        if header["codec"] != "zstd":
            raise Refused(f"unknown codec {header['codec']!r}")
        stdin = Unzstd(stdin)
        header = _line(stdin)
    manifest = header.get("manifest")
    if not isinstance(manifest, dict) or not isinstance(header.get("delete"), list):
        raise Refused("no stream header")
    for name in header["delete"]:
        tree._split(name)  # check every path before touching anything
    for name in header["delete"]:
        tree.delete(name)
    count = 0
    while True:
        meta = _line(stdin)
        if "end" in meta:
            break
        if "p" not in meta or "n" not in meta:
            raise Refused("truncated stream")
        name, size = meta["p"], meta["n"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise Refused(f"bad size {size!r}")
        if not isinstance(name, str) or name not in manifest:
            raise Refused(f"{name!r} not in the manifest")
        mtime = manifest[name][1] if isinstance(manifest[name], list) else None
        tree.write(
            name,
            _frame_chunks(stdin, size, meta.get("z")),
            0o755 if meta.get("x") else 0o644,
            mtime if isinstance(mtime, int) and not isinstance(mtime, bool) else None,
        )
        count += 1
    tree.write(MANIFEST, [json.dumps(manifest).encode()], 0o644)
    return count


def main(dest):
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _stop)
    tree = None
    try:
        tree = Tree(dest)
        count = receive(tree, Stream(sys.stdin.fileno()))
    except Refused as e:
        sys.stderr.write(f"mlcloud sync: refused: {e}\n")
        sys.exit(3)
    except Failed as e:
        sys.stderr.write(f"mlcloud sync: failed in {dest}: {e}; the partial file was removed\n")
        sys.exit(4)
    except OSError as e:  # DEST itself cannot be made
        sys.stderr.write(f"mlcloud sync: failed: {dest}: {e.strerror}\n")
        sys.exit(4)
    finally:
        if tree is not None:
            tree.close()
    print(count)


if __name__ == "__main__":
    main(sys.argv[1])
