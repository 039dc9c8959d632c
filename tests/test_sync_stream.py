"""The streamed sync (what SSH nodes receive), driven through the local transport, and the
receiver's refusals of hostile streams."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

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


def receive(dest, header: dict, members: list[tarfile.TarInfo], data=b"x"):
    buf = io.BytesIO()
    buf.write(json.dumps(header).encode() + b"\n")
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m in members:
            if m.isreg():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    code = (
        "import sys; exec(open(sys.argv[1]).read().replace('__main__', '__x__')); main(sys.argv[2])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(templates.path("receive.py")), str(dest)],
        input=buf.getvalue(),
        capture_output=True,
    )


def reg(name):
    return tarfile.TarInfo(name)


def link(name, target, kind=tarfile.SYMTYPE):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, target
    return m


@pytest.mark.parametrize(
    "member",
    [
        reg("/etc/evil"),
        reg("../evil"),
        reg("a/../../evil"),
        link("l", "/etc/passwd"),
        link("h", "/etc/passwd", tarfile.LNKTYPE),
    ],
)
def test_receiver_refuses_hostile_members(tmp_path, member):
    dest = tmp_path / "dest"
    r = receive(dest, {"delete": [], "manifest": {}}, [member])
    assert r.returncode == 3 and b"refused" in r.stderr
    assert not (tmp_path / "evil").exists()
    assert not (dest / ".mlcloud-manifest.json").exists()


def test_receiver_refuses_writing_through_a_symlinked_dir(tmp_path):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    r = receive(dest, {"delete": [], "manifest": {"sub/f": [1, 0, "d"]}}, [reg("sub/f")])
    assert r.returncode == 3 and not (outside / "f").exists()


def test_receiver_refuses_hostile_deletes(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    r = receive(tmp_path / "dest", {"delete": ["../victim"], "manifest": {}}, [])
    assert r.returncode == 3 and victim.exists()
