"""Edges a new user meets first, through the real CLI: a declined prompt is "aborted" (exit 1),
never bad input; `init` never writes through a symlink it did not make; `doctor` says what it
could check (clouds without credentials skipped and named, a state.db that cannot be
written)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import on_a_terminal, run_cli


def test_declining_any_prompt_is_aborted_exit_1_and_nothing_changes(mlcloud_home):
    """`down`, `gc` and `doctor --rebuild` ask on a terminal; "n" (or nothing) prints
    "aborted" and exits 1, with --json's kind "aborted"; the cluster is untouched."""
    assert run_cli("up", "keep", "--nodes", "1", "--yes").returncode == 0
    try:
        for args, answer in (
            (["down", "keep"], "n"),
            (["down", "keep", "--json"], ""),
            (["down", "keep"], "\x04"),  # Ctrl-D: the end of input is a no too
            (["doctor", "--rebuild", "-p", "local"], "no"),
        ):
            r = on_a_terminal(args, answer)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert r.stderr.endswith("aborted\n") and "error" not in r.stderr, (args, r.stderr)
            if "--json" in args:
                assert json.loads(r.stdout)["error"] == {
                    "kind": "aborted",
                    "message": "aborted",
                    "exit_code": 1,
                }
        # a local node directory no state knows, older than --min-age: gc would ask
        orphan = mlcloud_home / "local" / "lost-0123abcd" / "node-0"
        orphan.mkdir(parents=True)
        os.utime(orphan, (0, 0))
        r = on_a_terminal(["gc", "-p", "local"], "n")
        assert r.returncode == 1 and r.stderr.endswith("aborted\n") and orphan.exists(), r.stderr
        status = json.loads(run_cli("status", "--json").stdout)["clusters"]
        assert [c["name"] for c in status] == ["keep"]
    finally:
        assert run_cli("down", "keep", "--yes").returncode == 0


@pytest.mark.parametrize("kind", ["dangling", "to_a_file", "to_a_dir"])
def test_init_never_writes_through_a_symlink(tmp_path, kind):
    """A DIR/train.py symlink, dangling or not, is in the way: refused in one line (exit 2),
    nothing created where it points, nothing written in DIR."""
    project = tmp_path / "proj"
    project.mkdir()
    outside = tmp_path / "outside"
    target = outside / "train.py"
    if kind == "to_a_file":
        outside.mkdir()
        target.write_text("mine\n")
    elif kind == "to_a_dir":
        target.mkdir(parents=True)
    (project / "train.py").symlink_to(target)
    r = run_cli("init", str(project))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "train.py already exists" in r.stderr, r.stderr
    assert sorted(p.name for p in project.iterdir()) == ["train.py"]
    if kind == "dangling":
        assert not os.path.lexists(target) and not outside.exists()
    elif kind == "to_a_file":
        assert target.read_text() == "mine\n"
    else:
        assert list(target.iterdir()) == []
    # a dangling symlink standing for DIR itself is not followed either
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    r = run_cli("init", str(link))
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "nowhere").exists()
    # and a clean directory still gets its project
    r = run_cli("init", str(tmp_path / "fresh"))
    assert r.returncode == 0 and (tmp_path / "fresh" / "train.py").is_file(), r.stderr


def test_doctor_rebuild_skips_clouds_without_credentials_and_exits_0(mlcloud_home):
    """No cloud credentials here: the default set skips aws and gce, names them, and the
    rebuild of every local cluster is whole (exit 0). Naming a cloud that cannot be searched
    is still an incomplete rebuild (exit 1)."""
    assert run_cli("up", "lone", "--nodes", "1", "--yes").returncode == 0
    try:
        for f in mlcloud_home.glob("state.db*"):
            f.unlink()
        r = run_cli("doctor", "--rebuild", "--yes", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        assert report["ok"] and report["rebuild"]["unsearched"] == []
        assert [c["name"] for c in report["rebuild"]["clusters"]] == ["lone"]
        skipped = report["rebuild"]["skipped"]
        assert [s.split(":")[0] for s in skipped] == ["aws", "gce"], skipped
        r = run_cli("doctor", "--rebuild", "--yes")
        assert r.returncode == 0, r.stderr
        assert "warning: aws: not searched" in r.stderr and "warning: gce: not searched" in r.stderr
        r = run_cli("doctor", "--rebuild", "--yes", "-p", "local", "-p", "gce")
        assert r.returncode == 1 and "gce could not be searched" in r.stderr, r.stderr
        helptext = " ".join(run_cli("doctor", "--help").stdout.split())
        assert "default: every provider this machine has credentials for" in helptext
    finally:
        assert run_cli("down", "lone", "--yes").returncode == 0


def _unwritable(path: Path):
    """Make a file unwritable even for root: `chattr +i`, else a read-only bind mount.
    Returns the undo."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(path), str(path)], check=True)
    return lambda: subprocess.run(["umount", str(path)], check=True)


def test_doctor_fails_a_state_db_that_cannot_be_written(mlcloud_home):
    if os.geteuid() != 0:
        pytest.skip("making a file unwritable for its owner needs root (CI runs as root)")
    assert run_cli("status").returncode == 0  # the home and its database exist
    db = mlcloud_home / "state.db"
    undo = _unwritable(db)
    try:
        r = run_cli("doctor", "--json")
        assert r.returncode == 1, r.stdout
        report = json.loads(r.stdout)
        db_checks = [c for c in report["checks"] if c["area"] == "database"]
        assert [c["status"] for c in db_checks] == ["fail"], db_checks
        assert "cannot be written" in db_checks[0]["detail"]
        assert r.stderr.startswith(f"error: {db}: cannot be written"), r.stderr
        assert r.stderr.count("\n") == 1
    finally:
        undo()
    assert run_cli("doctor").returncode == 0
