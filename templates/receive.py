"""Node side of a workdir sync: apply one stream from stdin into DEST.

Run as `python3 -I -S -c <this file> DEST`; standard library only. The stream (built by
mlcloud/remote/sync.py `pack`) is a JSON header line ({"delete": [...], "manifest": {...}}),
then per file a JSON line ({"p": path, "n": size, "z": zlib?, "x": executable?}) and its
bytes, then {"end": count}. Only regular files can be expressed; a path that is absolute,
has `..`, or would land outside DEST (through a symlinked directory, say) is refused before it
is written or deleted. A truncated stream is refused where it breaks off; the manifest is
written only at the end, so the next sync sends again whatever did not arrive.
"""

import json
import os
import sys
import zlib

MANIFEST = ".mlcloud-manifest.json"


def _refuse(why):
    sys.stderr.write(f"mlcloud sync: refused: {why}\n")
    sys.exit(3)


def _target(dest_real, name, checked):
    parts = name.split("/") if isinstance(name, str) else [""]
    if not name or name.startswith("/") or ".." in parts or "" in parts or "\0" in name:
        _refuse(f"unsafe path {name!r}")
    path = os.path.join(dest_real, *parts)
    parent = os.path.dirname(path)
    if parent not in checked:  # resolved once per directory
        real = os.path.realpath(parent)
        if real != dest_real and not real.startswith(dest_real + os.sep):
            _refuse(f"{name!r} would be written outside the workdir")
        checked.add(parent)
    if os.path.islink(path):
        os.unlink(path)
    return path


def main(dest):
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    stdin = sys.stdin.buffer
    header = json.loads(stdin.readline() or "{}")
    if "manifest" not in header:
        _refuse("no stream header")
    manifest, checked = header["manifest"], set()
    for name in header["delete"]:
        path = _target(dest_real, name, checked)
        if os.path.lexists(path) and not os.path.isdir(path):
            os.unlink(path)
    count = 0
    while True:
        meta = json.loads(stdin.readline() or "{}")
        if "end" in meta:
            break
        if "p" not in meta or "n" not in meta:
            _refuse("truncated stream")
        name, size = meta["p"], meta["n"]
        path = _target(dest_real, name, checked)
        data = stdin.read(size)
        if len(data) != size or name not in manifest:
            _refuse("truncated stream" if len(data) != size else f"{name!r} not in the manifest")
        if meta.get("z"):
            data = zlib.decompress(data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.mlcloud-tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o755 if meta.get("x") else 0o644)
        mtime_ns = manifest[name][1]
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
        count += 1
    tmp = os.path.join(dest_real, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, os.path.join(dest_real, MANIFEST))
    print(count)


if __name__ == "__main__":
    main(sys.argv[1])
