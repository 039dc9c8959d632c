"""The streamed sync (what SSH nodes receive), driven through the local transport, and the
receiver's refusals of hostile streams."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mlcloud import templates
from mlcloud.errors import UsageError
from mlcloud.remote import sync
from mlcloud.remote.local import LocalTransport
from mlcloud.remote.transport import RemoteError


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


# --- what the job left in the workdir is never written through ------------------------------


def test_a_planted_symlink_is_replaced_never_written_through(tmp_path):
    dest, victim = tmp_path / "dest", tmp_path / "victim"
    dest.mkdir()
    victim.write_text("keep")
    (dest / "a.py.mlcloud-tmp").symlink_to(victim)  # where the receiver writes first
    (dest / "b.py").symlink_to(victim)  # the target itself
    manifest = {"a.py": [1, 0, "d"], "b.py": [1, 0, "d"]}
    r = receive(dest, {"delete": [], "manifest": manifest}, [frame("a.py"), frame("b.py")])
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep"
    assert (dest / "a.py").read_text() == "x" and not (dest / "a.py").is_symlink()
    assert (dest / "b.py").read_text() == "x" and not (dest / "b.py").is_symlink()
    assert not os.path.lexists(dest / "a.py.mlcloud-tmp")


def test_a_symlinked_parent_is_refused_not_followed(tmp_path):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    (dest / "pkg").mkdir(parents=True)
    outside.mkdir()
    (dest / "pkg" / "sub").symlink_to(outside)  # deeper than the top level
    name = "pkg/sub/f.py"
    r = receive(dest, {"delete": [], "manifest": {name: [1, 0, "d"]}}, [frame(name)])
    assert r.returncode == 3 and b"'pkg/sub'" in r.stderr and b"symlink" in r.stderr
    assert list(outside.iterdir()) == []
    r = receive(dest, {"delete": [name], "manifest": {}}, [])
    assert r.returncode == 3 and list(outside.iterdir()) == []


def test_a_workdir_swapped_for_a_symlink_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dest").symlink_to(outside)
    r = receive(tmp_path / "dest", {"delete": [], "manifest": {"f": [1, 0, "d"]}}, [frame("f")])
    assert r.returncode == 3 and b"not a plain directory" in r.stderr
    assert list(outside.iterdir()) == []


def test_a_file_replaced_by_a_directory_and_back(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, {"x/y.py": "y"})
    t = LocalTransport("node0")
    sync.push(t, src, str(dst))
    (src / "x/y.py").unlink()
    (src / "x").rmdir()
    (src / "x").write_text("now a file")
    s = sync.push(t, src, str(dst))
    assert (s.files_sent, s.files_deleted) == (1, 1)
    assert (dst / "x").read_text() == "now a file"


# --- a sync that fails leaves nothing partial ------------------------------------------------


def partial_files(root) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".mlcloud-tmp")]


def test_a_stream_cut_mid_file_leaves_no_partial_file(tmp_path):
    dest = tmp_path / "dest"
    meta, _ = frame("big.bin", b"0" * 3_000_000)
    r = receive(
        dest,
        {"delete": [], "manifest": {"big.bin": [3_000_000, 0, "d"]}},
        [(meta, b"0" * 2_500_000)],  # more than one chunk written before the break
        end=False,
    )
    assert r.returncode == 3 and b"truncated" in r.stderr
    assert partial_files(dest) == [] and not (dest / "big.bin").exists()


def test_a_receiver_stopped_mid_file_removes_it(tmp_path):
    dest = tmp_path / "dest"
    header = {"delete": [], "manifest": {"big.bin": [10_000_000, 0, "d"]}}
    p = subprocess.Popen(
        [sys.executable, str(templates.path("receive.py")), str(dest)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdin is not None
    p.stdin.write(json.dumps(header).encode() + b"\n")
    p.stdin.write(json.dumps(frame("big.bin")[0] | {"n": 10_000_000}).encode() + b"\n")
    p.stdin.write(b"0" * 2_000_000)  # then the sender stalls, as a dying connection does
    p.stdin.flush()
    tmp = dest / "big.bin.mlcloud-tmp"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not tmp.exists() or tmp.stat().st_size < 2_000_000):
        time.sleep(0.02)
    assert tmp.stat().st_size == 2_000_000  # all it was sent is written: it waits for more
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 128 + signal.SIGTERM
    p.stdin.close()
    assert partial_files(dest) == [] and not (dest / "big.bin").exists()


def test_a_full_node_disk_fails_in_one_line_and_keeps_nothing_partial(small_disk, tmp_path):
    src = tmp_path / "src"
    tree(src, {"a.py": "a"})
    (src / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # the disk holds 1 MiB
    dst = small_disk / "workdir"
    with pytest.raises(RemoteError) as e:
        sync.push(LocalTransport("node0"), src, str(dst))
    message = str(e.value)
    assert "\n" not in message
    assert "node0" in message and "'weights.bin'" in message and "No space left" in message
    assert partial_files(small_disk) == [] and not (dst / "weights.bin").exists()
    assert not (dst / sync.MANIFEST).exists()  # the next sync sends everything again
    (src / "weights.bin").unlink()
    s = sync.push(LocalTransport("node0"), src, str(dst))
    assert s.files_sent == 1 and (dst / sync.MANIFEST).exists()


def test_over_ssh_a_planted_symlink_is_replaced_and_a_full_disk_named(
    make_ssh_nodes, small_disk, tmp_path
):
    """The same receiver behind a real sshd: what the job planted in the workdir is replaced,
    and a node whose disk fills says so in one line, with nothing partial left there."""
    from mlcloud.remote.ssh import SshTarget, SshTransport

    nodes = make_ssh_nodes(1)
    n = nodes.nodes[0]
    t = SshTransport(
        SshTarget(n.host, n.port, n.user, str(nodes.client_key), python=nodes.python), "node0"
    )
    src, dst, victim = tmp_path / "src", tmp_path / "dst", tmp_path / "victim"
    tree(src, {"train.py": "t", "pkg/mod.py": "m"})
    victim.write_text("keep")
    dst.mkdir()
    (dst / "train.py").symlink_to(victim)
    (dst / "pkg").mkdir()
    (dst / "pkg/mod.py.mlcloud-tmp").symlink_to(victim)
    try:
        assert sync.push(t, src, str(dst)).files_sent == 2
        assert victim.read_text() == "keep"
        assert (dst / "train.py").read_text() == "t" and (dst / "pkg/mod.py").read_text() == "m"
        assert partial_files(dst) == []
        # more than SSH's window: the sender is still writing when the node gives up
        (src / "weights.bin").write_bytes(os.urandom(16 * 1024 * 1024))
        with pytest.raises(RemoteError) as e:
            sync.push(t, src, str(small_disk / "workdir"))
        assert "\n" not in str(e.value) and str(e.value).startswith("node0: syncing the workdir")
        assert "'weights.bin': No space left on device" in str(e.value)
        assert partial_files(small_disk) == []
    finally:
        t.close()


def test_a_file_the_job_left_where_a_directory_goes_is_named(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "pkg").write_text("made by the job")
    name = "pkg/mod.py"
    r = receive(dest, {"delete": [], "manifest": {name: [1, 0, "d"]}}, [frame(name)])
    assert r.returncode == 3 and b"'pkg' on the node is not a directory" in r.stderr
    assert (dest / "pkg").read_text() == "made by the job"


# --- zstd: what files share travels once; a node that cannot decode it is never sent it -------


def shared_content_tree(root, files=30, size=40_000):
    """Files that are the same random bytes but for a line: incompressible one by one."""
    blob = os.urandom(size)
    for i in range(files):
        p = root / f"pkg{i % 3}" / f"part{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"part {i}\n".encode() + blob)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    return files * size


def run_receiver(dest, stream: bytes, prelude: str = ""):
    """receive.py as the client runs it on a node: -I -S, the source as a program text."""
    code = prelude + open(templates.path("receive.py")).read()
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(dest)], input=stream, capture_output=True
    )


def test_a_zstd_stream_carries_what_files_share_once_and_decodes_without_site(tmp_path):
    src = tmp_path / "src"
    size = shared_content_tree(src)
    manifest = sync.scan(src)
    zlib_stream = sync.pack(src, sorted(manifest), [], manifest)
    zstd_stream = sync.pack(src, sorted(manifest), [], manifest, sync.ZSTD)
    assert len(zlib_stream) > size  # one file at a time, random bytes do not compress
    assert len(zstd_stream) < 0.1 * size
    assert zstd_stream.startswith(b'{"codec": "zstd"}\n')
    dest = tmp_path / "dest"
    r = run_receiver(dest, zstd_stream)  # -S: zstandard is found in site-packages on demand
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == b"31"
    for rel, entry in manifest.items():
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
        assert (dest / rel).stat().st_mtime_ns == entry.mtime_ns
    assert (dest / "run.sh").stat().st_mode & 0o111
    assert sync.load((dest / sync.MANIFEST).read_bytes()) == manifest


def test_a_python_without_zstd_refuses_a_zstd_stream_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    shared_content_tree(src, files=3)
    manifest = sync.scan(src)
    stream = sync.pack(src, sorted(manifest), [], manifest, sync.ZSTD)
    # neither zstandard nor 3.14's compression.zstd can be imported
    blocked = "import sys; sys.modules['zstandard'] = sys.modules['compression'] = None\n"
    r = run_receiver(tmp_path / "dest", stream, blocked)
    assert r.returncode == 3 and b"zstd and this Python cannot decode it" in r.stderr
    assert list((tmp_path / "dest").iterdir()) == []
    r = run_receiver(tmp_path / "dest", sync.pack(src, sorted(manifest), [], manifest), blocked)
    assert r.returncode == 0, r.stderr  # zlib: the standard library's


def test_a_zstd_stream_cut_short_or_corrupt_or_of_another_codec_is_refused(tmp_path):
    src = tmp_path / "src"
    (src / "big").mkdir(parents=True)
    (src / "big" / "w.bin").write_bytes(os.urandom(3_000_000))  # more than one read
    manifest = sync.scan(src)
    stream = sync.pack(src, sorted(manifest), [], manifest, sync.ZSTD)
    dest = tmp_path / "dest"
    r = run_receiver(dest, stream[: len(stream) // 2])
    assert r.returncode == 3 and b"truncated" in r.stderr
    assert partial_files(dest) == [] and not (dest / sync.MANIFEST).exists()
    line = len(b'{"codec": "zstd"}\n')
    r = run_receiver(dest, stream[:line] + b"not zstd at all" + stream[line:])
    assert r.returncode == 3 and b"corrupt compressed data" in r.stderr
    r = run_receiver(dest, b'{"codec": "brotli"}\n' + stream[line:])
    assert r.returncode == 3 and b"unknown codec 'brotli'" in r.stderr
    assert partial_files(dest) == [] and not (dest / sync.MANIFEST).exists()


def test_a_file_deleted_while_the_zstd_stream_is_packed_is_named(tmp_path):
    src = tmp_path / "src"
    tree(src, {"a.py": "a", "b.py": "b"})
    manifest = sync.scan(src)
    (src / "b.py").unlink()
    with pytest.raises(UsageError, match=r"b\.py was deleted while syncing"):
        list(sync.frames(src, sorted(manifest), [], manifest, sync.ZSTD))
