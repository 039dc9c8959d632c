"""Node side of a workdir sync: apply one compressed stream from stdin into DEST.

Run as `python3 -c <this file> DEST`; standard library only. The stream is one JSON line
({"delete": [...], "manifest": {...}}) followed by a tar.gz of the changed files. Only regular
files are accepted; absolute paths, `..` and anything that would land outside DEST (through a
symlinked directory, say) are refused before a byte is written there.
"""

import json
import os
import sys
import tarfile

MANIFEST = ".mlcloud-manifest.json"


def _refuse(why):
    sys.stderr.write(f"mlcloud sync: refused: {why}\n")
    sys.exit(3)


def _target(dest_real, name):
    parts = name.split("/")
    if not name or name.startswith("/") or ".." in parts or "" in parts or "\0" in name:
        _refuse(f"unsafe path {name!r}")
    path = os.path.join(dest_real, *parts)
    parent = os.path.realpath(os.path.dirname(path))
    if parent != dest_real and not parent.startswith(dest_real + os.sep):
        _refuse(f"{name!r} would be written outside the workdir")
    if os.path.islink(path):
        os.unlink(path)
    return path


def main(dest):
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    stdin = sys.stdin.buffer
    header = json.loads(stdin.readline())
    for name in header["delete"]:
        path = _target(dest_real, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            os.unlink(path)
    count = 0
    with tarfile.open(fileobj=stdin, mode="r|gz") as tar:
        for member in tar:
            if not member.isreg():
                _refuse(f"{member.name!r} is not a regular file")
            path = _target(dest_real, member.name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.mlcloud-tmp"
            src = tar.extractfile(member)
            with open(tmp, "wb") as f:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
            os.chmod(tmp, 0o755 if member.mode & 0o111 else 0o644)
            mtime_ns = header["manifest"][member.name][1]
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            os.replace(tmp, path)
            count += 1
    tmp = os.path.join(dest_real, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(header["manifest"], f)
    os.replace(tmp, os.path.join(dest_real, MANIFEST))
    print(count)


if __name__ == "__main__":
    main(sys.argv[1])
