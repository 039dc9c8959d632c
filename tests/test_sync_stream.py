"""The streamed sync (what SSH nodes receive), driven through the local transport, and the
receiver's refusals of hostile streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlcloud import templates
from mlcloud.remote import sync
from mlcloud.remote.local import LocalTransport


def tree(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_push_sends_changes_only_and_deletes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(
        src,
        {
            "a.py": "a",
            "pkg/b.py": "b",
            "x.sh": "#!/bin/sh\n",
            ".gitignore": "*.log\n",
            "junk.log": "j",
        },
    )
    (src / "x.sh").chmod(0o755)
    t = LocalTransport("node0")
    s = sync.push(t, src, str(dst))
    assert (s.files_sent, s.files_deleted) == (4, 0)
    assert (dst / "pkg/b.py").read_text() == "b" and not (dst / "junk.log").exists()
    assert (dst / "x.sh").stat().st_mode & 0o111
    assert (dst / "a.py").stat().st_mtime_ns == (src / "a.py").stat().st_mtime_ns
    assert sync.push(t, src, str(dst)).files_sent == 0
    (src / "a.py").write_text("A")
    (src / "pkg/b.py").unlink()
    s = sync.push(t, src, str(dst))
    assert (s.files_sent, s.files_deleted) == (1, 1)
    assert (dst / "a.py").read_text() == "A" and not (dst / "pkg/b.py").exists()


def receive(dest, header: dict, frames: list[tuple[dict, bytes]], end: bool = True):
    """Feed the node-side receiver a hand-made stream, hostile or truncated."""
    stream = json.dumps(header).encode() + b"\n"
    for meta, data in frames:
        stream += json.dumps(meta).encode() + b"\n" + data
    if end:
        stream += json.dumps({"end": len(frames)}).encode() + b"\n"
    code = (
        "import sys; exec(open(sys.argv[1]).read().replace('__main__', '__x__')); main(sys.argv[2])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(templates.path("receive.py")), str(dest)],
        input=stream,
        capture_output=True,
    )


def frame(name: str, data: bytes = b"x") -> tuple[dict, bytes]:
    return {"p": name, "n": len(data), "z": False, "x": False}, data


@pytest.mark.parametrize("name", ["/etc/evil", "../evil", "a/../../evil", "a//b", ""])
def test_receiver_refuses_hostile_paths(tmp_path, name):
    dest = tmp_path / "dest"
    r = receive(dest, {"delete": [], "manifest": {name: [1, 0, "d"]}}, [frame(name)])
    assert r.returncode == 3 and b"refused" in r.stderr
    assert not (tmp_path / "evil").exists()
    assert not (dest / ".mlcloud-manifest.json").exists()


def test_receiver_refuses_writing_through_a_symlinked_dir(tmp_path):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    r = receive(dest, {"delete": [], "manifest": {"sub/f": [1, 0, "d"]}}, [frame("sub/f")])
    assert r.returncode == 3 and not (outside / "f").exists()


def test_receiver_refuses_hostile_deletes(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    r = receive(tmp_path / "dest", {"delete": ["../victim"], "manifest": {}}, [])
    assert r.returncode == 3 and victim.exists()


def test_receiver_refuses_a_truncated_stream(tmp_path):
    dest = tmp_path / "dest"
    meta, _ = frame("f", b"0123456789")
    r = receive(
        dest, {"delete": [], "manifest": {"f": [10, 0, "d"]}}, [(meta, b"01234")], end=False
    )
    assert r.returncode == 3 and b"truncated" in r.stderr
    assert not (dest / ".mlcloud-manifest.json").exists()


def test_compressible_files_travel_compressed_others_as_they_are(tmp_path):
    src = tmp_path / "src"
    tree(src, {"code.py": "x = 1\n" * 20000})
    (src / "weights.bin").write_bytes(os.urandom(200_000))
    manifest = sync.scan(src)
    stream = sync.pack(src, sorted(manifest), [], manifest)
    assert len(stream) < 200_000 + 120_000 / 3 + 1000  # text compressed, random bytes not
    r = subprocess.run(
        [sys.executable, str(templates.path("receive.py")), str(tmp_path / "d")],
        input=stream,
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d/weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert (tmp_path / "d/code.py").read_text() == (src / "code.py").read_text()
