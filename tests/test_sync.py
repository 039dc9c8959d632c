"""Workdir sync by manifest: only changes travel; ignore rules; no escaping symlinks."""

from __future__ import annotations

import os

import pytest

from mlcloud.errors import UsageError
from mlcloud.remote.sync import local_sync, scan


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
