"""Workdir sync by manifest: only changes travel; ignore rules; no escaping symlinks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mlcloud.errors import MlcloudError, UsageError
from mlcloud.remote.sync import Limits, check_workdir, local_sync, parse_size, scan


def tree(root, files: dict[str, str]):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_first_sync_then_only_changes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, {"a.py": "a", "pkg/b.py": "b", "data/c.txt": "c"})
    s = local_sync(src, dst)
    assert (s.files_sent, s.files_deleted) == (3, 0)
    assert (dst / "pkg/b.py").read_text() == "b"
    assert local_sync(src, dst).files_sent == 0
    (src / "a.py").write_text("changed")
    (src / "data/c.txt").unlink()
    s = local_sync(src, dst)
    assert (s.files_sent, s.files_deleted) == (1, 1)
    assert (dst / "a.py").read_text() == "changed" and not (dst / "data/c.txt").exists()


def test_touch_without_change_sends_nothing(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, {"a.py": "a"})
    local_sync(src, dst)
    os.utime(src / "a.py", (1, 1))
    assert local_sync(src, dst).files_sent == 0


def test_ignore_rules(tmp_path):
    src = tmp_path / "src"
    tree(
        src,
        {
            ".gitignore": "*.log\nbuild/\n",
            ".mlcloudignore": "secret.txt\n!keep.log\n",
            "a.py": "",
            "x.log": "",
            "keep.log": "",
            "build/out.bin": "",
            "secret.txt": "",
            ".git/HEAD": "",
            "__pycache__/a.pyc": "",
            "sub/y.log": "",
        },
    )
    assert sorted(scan(src)) == [".gitignore", ".mlcloudignore", "a.py", "keep.log"]


def test_symlink_inside_is_followed_outside_refused(tmp_path):
    src = tmp_path / "src"
    tree(src, {"real.py": "x"})
    (src / "link.py").symlink_to(src / "real.py")
    assert "link.py" in scan(src)
    (tmp_path / "secret").write_text("s")
    (src / "escape").symlink_to(tmp_path / "secret")
    with pytest.raises(UsageError, match="outside the workdir"):
        scan(src)


def test_missing_workdir(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        scan(tmp_path / "nope")


# --- the local provider's copy never writes through what the job left -----------------------


def test_local_sync_replaces_planted_symlinks_never_writes_through(tmp_path):
    src, dst, victim = tmp_path / "src", tmp_path / "dst", tmp_path / "victim"
    tree(src, {"a.py": "a", "b.py": "b"})
    victim.write_text("keep")
    dst.mkdir()
    (dst / "a.py").symlink_to(victim)  # the target itself
    (dst / "b.py.mlcloud-tmp").symlink_to(victim)  # the temporary written first
    assert local_sync(src, dst).files_sent == 2
    assert victim.read_text() == "keep"
    assert (dst / "a.py").read_text() == "a" and not (dst / "a.py").is_symlink()
    assert (dst / "b.py").read_text() == "b"
    assert not os.path.lexists(dst / "b.py.mlcloud-tmp")


def test_local_sync_refuses_a_symlinked_parent(tmp_path):
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    tree(src, {"pkg/mod.py": "m"})
    outside.mkdir()
    dst.mkdir()
    (dst / "pkg").symlink_to(outside)
    with pytest.raises(UsageError, match="'pkg' on the node is a symlink"):
        local_sync(src, dst)
    assert list(outside.iterdir()) == []


def test_local_sync_keeps_the_mode_bits(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tree(src, {"run.sh": "#!/bin/sh\n", "secret.cfg": "k"})
    (src / "run.sh").chmod(0o755)
    (src / "secret.cfg").chmod(0o600)
    local_sync(src, dst)
    assert stat.S_IMODE((dst / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((dst / "secret.cfg").stat().st_mode) == 0o600
    assert (dst / "run.sh").stat().st_mtime_ns == (src / "run.sh").stat().st_mtime_ns


def test_local_sync_on_a_full_disk_fails_in_one_line_and_keeps_nothing_partial(
    small_disk, tmp_path
):
    src = tmp_path / "src"
    tree(src, {"a.py": "a"})
    (src / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    dst = small_disk / "workdir"
    with pytest.raises(MlcloudError) as e:
        local_sync(src, dst)
    assert "\n" not in str(e.value)
    assert "'weights.bin'" in str(e.value) and "No space left" in str(e.value)
    assert sorted(p.name for p in dst.iterdir()) == ["a.py"]  # no partial file, no manifest


# --- what cannot be read is named in one line ------------------------------------------------


def test_a_symlink_loop_is_named_with_what_to_do(tmp_path):
    src = tmp_path / "src"
    tree(src, {"a.py": "a"})
    (src / "loop1").symlink_to("loop2")
    (src / "loop2").symlink_to("loop1")
    for call in (scan, lambda root: check_workdir(root, Limits())):
        with pytest.raises(UsageError, match=r"loop1 is a symlink loop.*\.mlcloudignore"):
            call(src)
    (src / ".mlcloudignore").write_text("loop*\n")
    assert sorted(scan(src)) == [".mlcloudignore", "a.py"]


def test_special_files_and_dangling_links_are_skipped(tmp_path):
    src = tmp_path / "src"
    tree(src, {"a.py": "a"})
    os.mkfifo(src / "pipe")  # reading it would block forever
    (src / "gone").symlink_to(src / "missing")
    assert sorted(scan(src)) == ["a.py"]
    check_workdir(src, Limits())


def as_nobody(fn) -> str:
    """Run fn() in a child process as an unprivileged user (root reads mode-000 files);
    returns what it raised, as text, or '' if nothing."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, try, report, leave without running pytest's exit
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn()
            out = b""
        except BaseException as e:  # reported to the parent
            out = f"{type(e).__name__}: {e}".encode()
        os.write(write, out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def shared_dir():
    """A directory an unprivileged user can reach (pytest's tmp_path is root's own)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="mlcloud-sync-"))
    d.chmod(0o755)
    yield d
    for p in d.rglob("*"):
        if not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(d)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_an_unreadable_entry_is_named_with_what_to_do(shared_dir, what):
    src = shared_dir / "src"
    tree(src, {"a.py": "a", "data/x.csv": "1"})
    src.chmod(0o755)
    (src / "data").chmod(0o755)
    for p in src.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    victim = src / "data" / "x.csv" if what == "file" else src / "data"
    victim.chmod(0o000)
    for call in (scan, lambda root: check_workdir(root, Limits())):
        raised = as_nobody(lambda call=call: call(src))
        assert raised.startswith("UsageError: ") and "\n" not in raised
        name = "data/x.csv" if what == "file" else "data"
        assert f"cannot read {name} (Permission denied)" in raised
        assert ".mlcloudignore" in raised
    (src / ".mlcloudignore").write_text("data/\n")
    assert as_nobody(lambda: scan(src)) == ""


# --- a workdir too large to ship is refused before anything travels --------------------------


def test_limits_on_count_and_size(tmp_path):
    src = tmp_path / "src"
    tree(src, {f"data/{i}.txt": "x" * 100 for i in range(8)} | {"train.py": "t"})
    check_workdir(src, Limits(files=9, size=10_000))
    with pytest.raises(UsageError) as e:
        check_workdir(src, Limits(files=5, size=10_000))
    assert "more than 5 files" in str(e.value) and "data/ alone has 6" in str(e.value)
    assert ".mlcloudignore" in str(e.value) and "max_workdir_files" in str(e.value)
    with pytest.raises(UsageError) as e:
        check_workdir(src, Limits(files=100, size=500))
    assert "more than 500 B" in str(e.value) and "data/ alone is" in str(e.value)
    assert "max_workdir_size" in str(e.value)
    (src / ".mlcloudignore").write_text("data/\n")
    check_workdir(src, Limits(files=5, size=500))


def test_the_default_size_limit_needs_no_read(tmp_path):
    src = tmp_path / "src"
    tree(src, {"train.py": "t"})
    with open(src / "huge.bin", "wb") as f:  # sparse: 3 GiB seen, nothing on disk
        f.truncate(3 * 1024**3)
    with pytest.raises(UsageError, match=r"more than 2\.0 GiB.*huge\.bin alone is 3\.0 GiB"):
        check_workdir(src, Limits())


@pytest.mark.parametrize(
    "text,size",
    [("2GiB", 2 * 1024**3), ("500MB", 500_000_000), ("1.5 G", 1_500_000_000), ("10k", 10_000)]
    + [("4096", 4096), (123, 123), ("3 KiB", 3072)],
)
def test_parse_size(text, size):
    assert parse_size(text, "max_workdir_size") == size


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "2iB", True, 0, 1.5, "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match=r"max_workdir_size: .* is not a size"):
        parse_size(text, "max_workdir_size")
