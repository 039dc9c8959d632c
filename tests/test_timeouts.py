"""Waits the environment may change (mlcloud/state/timeouts.py): defaults, replacements, and a bad
value refused in one line before any command runs."""

from __future__ import annotations

import pytest
from conftest import run_cli

from mlcloud.errors import UsageError
from mlcloud.state import timeouts


def test_defaults_and_replacements(monkeypatch):
    for name in timeouts.DEFAULTS:
        monkeypatch.delenv(f"MLCLOUD_{name}", raising=False)
    # a silent node is given up after the heartbeat's timeout of silence: lost within the 10 s
    # the README promises, asked in time to answer
    assert timeouts.seconds("SSH_HEARTBEAT_TIMEOUT") < 10
    assert timeouts.seconds("SSH_HEARTBEAT_EVERY") <= timeouts.seconds("SSH_HEARTBEAT_TIMEOUT") / 2
    assert timeouts.seconds("FAIL_GRACE") == 15.0
    monkeypatch.setenv("MLCLOUD_FAIL_GRACE", " 2.5 ")
    assert timeouts.seconds("FAIL_GRACE") == 2.5
    for bad in ("x", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("MLCLOUD_DB_BUSY_TIMEOUT", bad)
        with pytest.raises(UsageError, match=r"MLCLOUD_DB_BUSY_TIMEOUT=.*positive number"):
            timeouts.check()


def test_the_cli_refuses_a_bad_value_in_one_line(monkeypatch):
    monkeypatch.setenv("MLCLOUD_SSH_HEARTBEAT_TIMEOUT", "soon")
    r = run_cli("status")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: MLCLOUD_SSH_HEARTBEAT_TIMEOUT='soon': expected a positive number of seconds, "
        "how long an SSH connection may hear nothing, asked, before the node counts as lost "
        "(default 8); "
        "fix or unset it"
    )


def test_launch_refuses_a_bad_move_wait_before_anything_is_made(monkeypatch, tmp_path):
    monkeypatch.setenv("MLCLOUD_MOVE_CHECK_EVERY", "-5")
    (tmp_path / "job.py").write_text("print('never')\n")
    r = run_cli("launch", "mv", "-w", str(tmp_path), "job.py", "--yes")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: MLCLOUD_MOVE_CHECK_EVERY=")
    assert "how often a managed job's watcher asks for live offers" in r.stderr
    assert run_cli("jobs", "--json").stdout.count('"name"') == 0  # no managed job recorded
