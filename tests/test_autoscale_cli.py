"""A local cluster whose nodes stopped themselves (the agent's own stop, no controller
running): `autoscale` reports them stopped and decides nothing more; `train` refuses."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlcloud.cli.app import run
from typer.testing import CliRunner

from mlcloud.provision import lifecycle

pytestmark = pytest.mark.e2e  # starts the node agent


def once_json(name: str) -> dict:
    """`autoscale NAME --once --json`, in-process: the pass's decisions, with their reasons."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run(["autoscale", name, "--once", "--json"]) == 0
    return json.loads(out.getvalue())


def test_once_json_gives_each_decision_with_its_reason(mlcloud_home):
    """A node gone from the provider's listing is replaced: the action, its node and why."""
    from mlcloud import state
    from mlcloud.remote.shell import stop_input, stop_line
    from mlcloud.report import PlainReporter
    from mlcloud.spec.task import TaskSpec

    store = state.open_store()
    rec = lifecycle.up(store, "lossy", TaskSpec(provider="local", nodes=2), PlainReporter(True))
    try:
        lost = rec.nodes[1]  # gone with its processes; the local provider lists directories
        line = stop_line(lost.python, lost.root, rec.uid)
        subprocess.run(["sh", "-c", line], input=stop_input(), check=True)
        shutil.rmtree(lost.root)
        (action,) = once_json("lossy")["actions"]
        assert action == {
            "kind": "replace",
            "reason": "node1 (local-1) lost: the provider lists it as missing",
            "node": 1,
        }
    finally:
        lifecycle.down(store, "lossy", PlainReporter(quiet=True))


def test_once_after_the_nodes_stopped_themselves(tmp_path, mlcloud_home):
    from mlcloud.cli.app import app

    from mlcloud import state
    from mlcloud.errors import UsageError
    from mlcloud.report import PlainReporter
    from mlcloud.spec.task import TaskSpec

    store = state.open_store()
    rec = lifecycle.up(store, "self", TaskSpec(provider="local"), PlainReporter(quiet=True))
    root = rec.nodes[0].root
    why = "idle for 30.0 min"
    subprocess.run(  # what the agent's dead-man switch runs, local state not told
        [sys.executable, "bin/agent.py", "stop", ".", "idle_teardown", why, "0"],
        cwd=root,
        check=True,
    )
    for _ in range(2):  # and a second pass (cron) says the same
        r = CliRunner().invoke(app, ["autoscale", "self", "--once"])
        assert r.exit_code == 0, r.output
        assert "every node is stopped" in r.output and "healthy" not in r.output, r.output
    assert once_json("self") == {"cluster": "self", "stopped": True, "actions": []}
    # the agent's stop is the one event of it: the controller decided no teardown of its own
    log = store.event_log("self", rec.uid)
    assert [(k, n) for _, k, n, _ in log if k == "idle_teardown"] == [("idle_teardown", 0)], log
    # `status --json` says what the text says: the node's reason, the newest events
    r = CliRunner().invoke(app, ["status", "self", "--json"])
    (c,) = json.loads(r.output)["clusters"]
    assert c["nodes"][0]["status"] == "terminated", c
    assert c["nodes"][0]["reason"].startswith(f"idle_teardown: {why}"), c
    assert c["events"][-1]["kind"] == "idle_teardown" and c["events"][-1]["node"] == 0
    assert c["events"][-1]["time"].endswith("+00:00")
    # a job there would run with no agent watching it (no idle teardown, no budget): refused
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "job.py").write_text("print('ran')\n")
    r = CliRunner().invoke(app, ["train", "self", "-w", str(tmp_path / "w"), "job.py"])
    assert isinstance(r.exception, UsageError), r.output  # exit 2, one line
    assert "node0 was stopped (idle_teardown" in str(r.exception)
    assert "mlcloud down self" in str(r.exception)
    assert not list(Path(root, "jobs").iterdir())
    r = CliRunner().invoke(app, ["up", "self", "--provider", "local", "--yes"])
    assert isinstance(r.exception, UsageError), r.output  # not "cluster self is up"
    lifecycle.down(store, "self", PlainReporter(quiet=True))


def test_once_leaves_no_heartbeat_behind(mlcloud_home):
    """`--once` from cron an hour apart: a heartbeat left by one pass would read as a lost
    controller after heartbeat_minutes (15), and the agents would stop a cluster mid-job."""
    from mlcloud.cli.app import app

    from mlcloud import state
    from mlcloud.report import PlainReporter
    from mlcloud.spec.task import TaskSpec

    store = state.open_store()
    rec = lifecycle.up(store, "cron", TaskSpec(provider="local"), PlainReporter(quiet=True))
    try:
        r = CliRunner().invoke(app, ["autoscale", "cron", "--once"])
        assert r.exit_code == 0 and "nothing to do" in r.output, r.output
        assert not Path(rec.nodes[0].root, "agent", "heartbeat").exists()
        assert once_json("cron") == {"cluster": "cron", "stopped": False, "actions": []}
        assert run(["autoscale", "cron", "--json"]) == 2  # a document per pass: only --once
    finally:
        lifecycle.down(store, "cron", PlainReporter(quiet=True))


def test_a_budget_on_unpriced_nodes_is_warned_of(tmp_path, mlcloud_home):
    """local and ssh nodes cost nothing here: a max_cost there would never stop anything."""
    from mlcloud.cli.app import app

    from mlcloud import state
    from mlcloud.report import PlainReporter

    spec = tmp_path / "mlcloud.yaml"
    spec.write_text("provider: local\nautoscale:\n  max_cost: 5\n")
    r = CliRunner().invoke(app, ["up", "free", "-f", str(spec), "--yes"])
    try:
        assert r.exit_code == 0, r.output
        assert "autoscale.max_cost is set but local nodes have no price" in r.output
    finally:
        lifecycle.down(state.open_store(), "free", PlainReporter(quiet=True))
