"""Machine-readable streams stay machine-readable to the end: `events --json --follow` is one
JSON object a line, and Ctrl-C (or SIGTERM) adds at most one more, on one line; every error
object on stdout is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import MLCLOUD, run_cli_in_process


def lines_of(stdout: str) -> list[dict]:
    """Every line a JSON object (what `jq -c`, `while read` and log shippers expect)."""
    assert stdout.endswith("\n"), stdout
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_on_events_json_follow_ends_with_one_json_line(mlcloud_home, sig):
    from mlcloud import state

    store = state.open_store()
    store.create_cluster("fol", "fol-1", "local", {}, "me")
    store.event("fol", "scale_up", "one node more")
    store.close()
    proc = subprocess.Popen(
        [MLCLOUD, "events", "fol", "--json", "--follow", "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the stream has begun
    assert json.loads(first)["kind"] in ("intent", "scale_up")
    time.sleep(0.2)  # inside a look or between two: either way one line more at most
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    objects = lines_of(first + rest)
    assert objects[-1] == {
        "error": {"kind": "interrupted", "message": "interrupted", "exit_code": 130}
    }
    assert all("error" not in o for o in objects[:-1])
    assert err.strip() == "error: interrupted"


def test_every_error_object_on_stdout_is_one_line(mlcloud_home):
    r = run_cli_in_process("events", "nope", "--json", "--follow")
    assert r.returncode == 1
    (doc,) = lines_of(r.stdout)
    assert doc["error"]["kind"] == "not_found"
    r = run_cli_in_process("status", "--json", "--bogus")
    assert r.returncode == 2 and lines_of(r.stdout)[0]["error"]["kind"] == "usage"


def test_a_followed_cluster_without_events_keeps_stdout_json(mlcloud_home):
    from mlcloud import state

    store = state.open_store()
    store.create_cluster("quiet", "quiet-1", "aws", {}, "me")
    store.delete_cluster("quiet")
    store.close()
    r = run_cli_in_process("events", "quiet", "--json", "--follow")
    assert r.returncode == 0, r.stderr
    assert all("kind" in o for o in lines_of(r.stdout)) if r.stdout else True
    assert "no events for quiet yet" not in r.stdout
