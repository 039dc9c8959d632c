"""Node side of `mlcloud pull`: list a job's output directory (and the newest complete
checkpoint), or send the files the client asked for.

Run as `python3 -I -S -c <this file>` with one JSON request on stdin; standard library only.
The request: {"mode": "list" | "send", "output": DIR, "checkpoints": DIR or null, and
"have": {path: [size, mtime_ns, digest]} (list) or "paths": [...] (send)}.

list prints {"files": [[path, size, mtime_ns, digest, mode], ...], "skipped": [...],
"checkpoint": name or null}. A file hashes only when the client holds it with another size or
mtime (it may be the same bytes touched); one it lacks has digest "" (the client hashes what
arrives), one unchanged keeps the client's digest: a second pull reads nothing it need not.

send writes, per path, a JSON line {"p": path, "n": size, "m": mode} and n bytes ({"p": path,
"gone": true} for a file deleted since it was listed), then {"end": count}.

Only regular files travel. Symlinks, sockets and devices below the directories asked for are
listed under "skipped", never followed, so what a job links to (/etc, another job's files)
stays on the node; the directories themselves may be links (a checkpoint dir on a big disk).
Paths are relative with "/": the output directory's own at the top, the newest checkpoint's
under `checkpoints/<its name>`. The client trusts none of this (mlcloud/remote/fetch.py
checks it).
"""

import hashlib
import json
import os
import re
import stat
import sys

MANIFEST = ".mlcloud-manifest.json"  # the client's own record in each node's folder
RESERVED_SUFFIX = ".mlcloud-tmp"  # the client's temporaries (templates/receive.py): NAME
RESERVED_PREFIX = ".mlcloud-tmp."  # plus the suffix, or this and a hash for the longest
TEMP_NAME = re.compile(r"(^\.)|(\.(tmp|temp|partial|incomplete|mlcloud-tmp)$)")
CKPT = "checkpoints/"
CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def digest(path):
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def walk(root, prefix, out, skipped):
    """(path, full path, stat) of each regular file below root, in name order."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for e in entries:
        rel = prefix + e.name
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted while we walked
        if stat.S_ISDIR(st.st_mode):
            walk(e.path, rel + "/", out, skipped)
        elif (
            stat.S_ISREG(st.st_mode)
            and rel != MANIFEST
            and not e.name.endswith(RESERVED_SUFFIX)
            and not e.name.startswith(RESERVED_PREFIX)
        ):
            out.append((rel, e.path, st))
        else:
            skipped.append(rel)


def in_progress(name):
    """Whether a checkpoint's name says it is still being written (hidden, .tmp, .partial)."""
    return bool(TEMP_NAME.search(name))


def step_of(name):
    """The step a checkpoint's name carries (its last number), or None."""
    steps = re.findall(r"\d+", name)
    return int(steps[-1]) if steps else None


def newest_checkpoint(ckpt_dir):
    """The entry with the highest step number in its name (ckpt-00000300.pt, step_300/), or,
    where no name has one (a job that overwrites model.pt), the newest; hidden and temporary
    names are checkpoints still being written, and are passed over. The one definition of the
    convention: pull uses it, and so does the node's checkpoint uploader (checkpoints.py)."""
    best = None
    try:
        entries = list(os.scandir(ckpt_dir))
    except (FileNotFoundError, NotADirectoryError):
        return None
    for e in entries:
        if in_progress(e.name) or e.is_symlink():
            continue
        step = step_of(e.name)
        numbered = (0, 0) if step is None else (1, step)
        key = (numbered, e.stat(follow_symlinks=False).st_mtime_ns, e.name)
        if best is None or key > best:
            best = key
    return None if best is None else best[2]


def listing(req):
    files, skipped = [], []
    walk(req["output"], "", files, skipped)
    name = newest_checkpoint(req["checkpoints"]) if req.get("checkpoints") else None
    if name is not None:
        files = [f for f in files if not (f[0] + "/").startswith(CKPT + name + "/")]
        path = os.path.join(req["checkpoints"], name)
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            walk(path, CKPT + name + "/", files, skipped)
        else:
            files.append((CKPT + name, path, st))
    have = req.get("have") or {}
    out = []
    for rel, path, st in files:
        old = have.get(rel)
        if not old:
            sha = ""
        elif old[0] == st.st_size and old[1] == st.st_mtime_ns:
            sha = old[2]
        else:
            sha = digest(path)
        out.append([rel, st.st_size, st.st_mtime_ns, sha, stat.S_IMODE(st.st_mode)])
    return {"files": out, "skipped": skipped, "checkpoint": name}


def open_below(root, rel):
    """A read descriptor for root/rel, never through a symlink below root."""
    parts = rel.split("/")
    if rel.startswith("/") or {"", ".", ".."} & set(parts):
        raise ValueError(f"unsafe path {rel!r}")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # as the listing saw it
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def write(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def send(req):
    name = req.get("checkpoint")
    count = 0
    for rel in req["paths"]:
        root, below = req["output"], rel
        if name and req.get("checkpoints") and (rel + "/").startswith(CKPT + name + "/"):
            root, below = req["checkpoints"], rel[len(CKPT) :]
        try:
            fd = open_below(root, below)
        except (FileNotFoundError, NotADirectoryError):
            write(json.dumps({"p": rel, "gone": True}).encode() + b"\n")
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                write(json.dumps({"p": rel, "gone": True}).encode() + b"\n")
                continue
            left = st.st_size
            meta = {"p": rel, "n": left, "m": stat.S_IMODE(st.st_mode)}
            write(json.dumps(meta).encode() + b"\n")
            while left:
                block = os.read(fd, min(CHUNK, left))
                if not block:
                    sys.stderr.write(f"mlcloud pull: {rel} shrank while it was sent\n")
                    sys.exit(3)
                write(block)
                left -= len(block)
        finally:
            os.close(fd)
        count += 1
    write(json.dumps({"end": count}).encode() + b"\n")


def main():
    req = json.loads(sys.stdin.buffer.read())
    try:
        if req["mode"] == "list":
            write(json.dumps(listing(req)).encode() + b"\n")
        else:
            send(req)
    except BrokenPipeError:
        sys.exit(141)  # the client stopped reading: it refused what it saw
    except ValueError as e:
        sys.stderr.write(f"mlcloud pull: refused: {e}\n")
        sys.exit(2)
    except OSError as e:
        sys.stderr.write(f"mlcloud pull: {e.filename or ''}: {e.strerror}\n")
        sys.exit(4)


if __name__ == "__main__":
    main()
