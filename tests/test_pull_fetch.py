"""Files coming home (mlcloud/remote/fetch.py with templates/send.py), in process over the
local transport: what arrives, what a second pull sends, which modes and files are refused.
The hostile-node battery over a real sshd node is in test_pull_ssh.py."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path

import pytest

from mlcloud.errors import UsageError
from mlcloud.remote import fetch
from mlcloud.remote.local import LocalTransport

GiB = 1024**3


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """sha256 of every regular file below root, the pull's own record left out."""
    return {
        str(p.relative_to(root)): sha(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name != fetch.MANIFEST
    }


@pytest.fixture
def node(tmp_path) -> Path:
    out = tmp_path / "node" / "outputs"
    (out / "sub" / "deep").mkdir(parents=True)
    (out / "model.bin").write_bytes(os.urandom(300_000))
    (out / "metrics.json").write_text('{"loss": 0.1}')
    (out / "sub" / "deep" / "log.txt").write_text("x" * 5000)
    run = out / "run.sh"
    run.write_text("#!/bin/sh\n")
    run.chmod(0o755)
    suid = out / "suid"
    suid.write_text("#!/bin/sh\n")
    suid.chmod(0o4755)
    (out / "etc").symlink_to("/etc")
    (out / "passwd").symlink_to("/etc/passwd")
    os.mkfifo(out / "fifo")
    return out


def pull(out: Path, dest: Path, cap: int = GiB, **kw) -> fetch.Fetched:
    return fetch.fetch(LocalTransport("node0"), {"output": str(out), **kw}, dest, cap)


def test_files_arrive_intact_and_a_second_pull_sends_only_what_changed(node, tmp_path):
    dest = tmp_path / "dest"
    got = pull(node, dest)
    want = tree(node)
    assert tree(dest) == want and len(want) == 5
    assert got.files == 5 and got.bytes > 300_000
    assert sorted(got.skipped) == ["etc", "fifo", "passwd"]  # never followed, never made
    assert not [p for p in dest.rglob("*") if p.is_symlink()]
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o644  # no set-uid, no exec
    assert stat.S_IMODE((dest / "model.bin").stat().st_mode) == 0o644

    again = pull(node, dest)
    assert (again.files, again.unchanged) == (0, 5) and again.bytes < 2000  # the listing only

    (node / "metrics.json").write_text('{"loss": 0.05}')
    (node / "model.bin").touch()  # same bytes, new mtime: hashed there, not sent
    (node / "sub" / "new.txt").write_text("new")
    (node / "sub" / "deep" / "log.txt").unlink()
    third = pull(node, dest)
    assert third.files == 2 and third.bytes < 3000
    assert tree(dest) == {**want, **tree(node)}  # a file deleted there stays here


def test_a_file_deleted_or_cut_short_here_comes_again(node, tmp_path):
    dest = tmp_path / "dest"
    pull(node, dest)
    (dest / "model.bin").unlink()
    (dest / "sub" / "deep" / "log.txt").write_text("cut")
    again = pull(node, dest)
    assert (again.files, again.unchanged) == (2, 3)
    assert tree(dest) == tree(node)


def test_the_newest_complete_checkpoint_comes_with_checkpoints(node, tmp_path):
    (tmp_path / "bigdisk").mkdir()  # the checkpoint directory may be a link to a big disk
    ckpt = tmp_path / "node" / "checkpoints"
    ckpt.symlink_to(tmp_path / "bigdisk")
    for name in ("ckpt-00000100.pt", "ckpt-00000200.pt", ".ckpt-00000300.pt.tmp", "progress.json"):
        (ckpt / name).write_bytes(name.encode())
    (ckpt / "step_250.partial").mkdir()
    dest = tmp_path / "dest"
    got = pull(node, dest, checkpoints=str(ckpt))
    assert got.checkpoint == "ckpt-00000200.pt"
    assert (dest / "checkpoints" / "ckpt-00000200.pt").read_bytes() == b"ckpt-00000200.pt"
    assert sorted(p.name for p in (dest / "checkpoints").iterdir()) == ["ckpt-00000200.pt"]
    (ckpt / "step_300").mkdir()  # a checkpoint that is a directory
    (ckpt / "step_300" / "shard0").write_text("s0")
    assert pull(node, dest, checkpoints=str(ckpt)).checkpoint == "step_300"
    assert (dest / "checkpoints" / "step_300" / "shard0").read_text() == "s0"


def test_a_checkpoint_without_a_step_number_is_the_newest_entry(node, tmp_path):
    """A job's own format: one file overwritten in place, next to an older one."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "best.pt").write_bytes(b"old")
    os.utime(ckpt / "best.pt", (1, 1))
    (ckpt / "model.pt").write_bytes(b"weights")
    got = pull(node, tmp_path / "dest", checkpoints=str(ckpt))
    assert got.checkpoint == "model.pt"
    assert (tmp_path / "dest" / "checkpoints" / "model.pt").read_bytes() == b"weights"


def test_over_the_cap_is_refused_before_anything_travels(node, tmp_path):
    with pytest.raises(UsageError, match=r"node0: .* over the limit of 100.0 KiB \(model.bin"):
        pull(node, tmp_path / "dest", cap=100 * 1024)
    assert not list((tmp_path / "dest").rglob("*.bin"))


HOSTILE = r"""
import json, os, sys
req = json.loads(sys.stdin.buffer.read())
listing, frames = json.loads(os.environ["LISTING"]), json.loads(os.environ["FRAMES"])
out = sys.stdout.buffer
if req["mode"] == "list":
    out.write(json.dumps(listing).encode() + b"\n")
else:
    for meta, body in frames:
        out.write(json.dumps(meta).encode() + b"\n" + body.encode())
"""


@pytest.fixture
def hostile(monkeypatch, tmp_path):
    """A node whose sender says what the test wants: (listing, [(frame, body), ...])."""
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)
    monkeypatch.setattr(fetch, "_command", lambda t: f"{sys.executable} -I {script}")

    def serve(files, frames=()):
        monkeypatch.setenv("LISTING", fetch.json.dumps({"files": files, "skipped": []}))
        monkeypatch.setenv("FRAMES", fetch.json.dumps(list(frames)))

    return serve


@pytest.mark.parametrize(
    "path",
    ["../../.bashrc", "/etc/cron.d/x", "a/../../b", "./x", "a//b", "", "x\0y", fetch.MANIFEST],
)
def test_an_unsafe_path_refuses_the_node(hostile, tmp_path, path):
    hostile([[path, 3, 0, "", 0o644], ["ok.txt", 2, 0, "", 0o644]])
    with pytest.raises(fetch.Refused, match="unsafe path"):
        pull(tmp_path / "out", tmp_path / "a" / "b" / "dest")
    assert list((tmp_path / "a" / "b" / "dest").iterdir()) == [
        tmp_path / "a" / "b" / "dest" / fetch.MANIFEST
    ]


def test_a_node_that_lies_about_a_size_is_refused_at_the_frame(hostile, tmp_path):
    hostile(
        [["big", 10, 0, "", 0o644]],
        [({"p": "big", "n": 100 * 10**9, "m": 0o644}, "x" * 1000)],
    )
    with pytest.raises(fetch.Refused, match="listed at 10 bytes and sent at 100,000,000,000"):
        pull(tmp_path / "out", tmp_path / "dest")
    assert not (tmp_path / "dest" / "big").exists()


F = {"p": "f", "n": 3, "m": 0o644}


@pytest.mark.parametrize(
    "frames, error, lands",
    [
        ([(F, "abc"), ({"p": "f", "n": 1, "m": 0}, "x")], "not asked", True),
        ([(F, "abcEXTRA\n")], "not a pull stream", True),
        ([({"p": "g", "n": 3, "m": 0o644}, "abc")], "not asked for", False),
        ([({**F, "link": "/etc"}, "abc")], "not a pull stream", False),
        ([(F, "ab")], "ended early", False),
        ([(F, "abc"), ({"end": 1}, "")], None, True),
    ],
)
def test_frames_must_be_what_was_asked(hostile, tmp_path, frames, error, lands):
    """A file lands only when its frame is whole and as listed; what follows is checked on."""
    hostile([["f", 3, 0, "", 0o644]], frames)
    if error is None:
        assert pull(tmp_path / "out", tmp_path / "dest").files == 1
    else:
        with pytest.raises(fetch.Refused, match=error):
            pull(tmp_path / "out", tmp_path / "dest")
    assert (tmp_path / "dest" / "f").exists() == lands
    assert not list((tmp_path / "dest").glob("*.mlcloud-tmp"))


def test_a_planted_symlink_in_dest_is_never_written_through(hostile, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "etc").symlink_to(victim)
    hostile([["etc/passwd", 3, 0, "", 0o644]], [({"p": "etc/passwd", "n": 3, "m": 0o644}, "own")])
    with pytest.raises(fetch.Refused, match=f"'etc' in {dest} is a symlink"):
        pull(tmp_path / "out", dest)
    assert list(victim.iterdir()) == []


def test_modes_never_carry_set_uid_or_world_writable_exec(hostile, tmp_path):
    modes = {"a": 0o4755, "b": 0o2755, "c": 0o1777, "d": 0o777, "e": 0o700, "f": 0o600}
    hostile(
        [[p, 1, 0, "", m] for p, m in modes.items()],
        [({"p": p, "n": 1, "m": 0o7777}, "x") for p in modes] + [({"end": 6}, "")],
    )
    pull(tmp_path / "out", tmp_path / "dest")
    got = {p: stat.S_IMODE((tmp_path / "dest" / p).stat().st_mode) for p in modes}
    # a file others could not read on the node stays private here (e: 0700, f: 0600)
    assert got == {"a": 0o644, "b": 0o644, "c": 0o644, "d": 0o644, "e": 0o700, "f": 0o600}
