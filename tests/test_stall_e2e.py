"""A stalled job stopped by the controller that `train` runs (`on_stall: stop`), through the
real `mlcloud` process and torchrun on the local provider. The job holds still (no step, no
output) and, like a rank stuck in a collective, does not end on SIGTERM, so the agent's own
stop cannot end it soon: the agent's verdict reaches the controller, which stops the job on
every node, and the events say why."""

from __future__ import annotations

import json
import time

import pytest
from conftest import run_cli, tagged_pids

pytestmark = pytest.mark.e2e

HUNG = """\
import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck in a collective: SIGTERM goes unseen
print("step 1", flush=True)
time.sleep(600)
"""
STALL_MINUTES = 0.05  # 3 s


def test_a_stalled_job_is_stopped_by_the_controller_and_the_events_say_why(tmp_path):
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text(
        f"autoscale:\n  stall_minutes: {STALL_MINUTES}\n  on_stall: stop\n  poll_seconds: 0.5\n"
    )
    project = tmp_path / "proj"
    project.mkdir()
    (project / "hung.py").write_text(HUNG)
    r = run_cli("up", "st", "-f", str(spec), "--yes")
    assert r.returncode == 0, r.stderr
    uid = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["uid"]

    started = time.monotonic()
    r = run_cli("train", "st", "-w", str(project), "hung.py", timeout=120)
    took = time.monotonic() - started
    said = r.stdout + r.stderr
    # SIGKILL after the controller's grace: the agent alone would wait a minute for the job
    assert r.returncode == 137, said[-3000:]
    assert f"job stalled on node0 for {STALL_MINUTES:g} min: stopping the job" in said, said
    # the last line names the rule, not only the signal
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("[mlcloud] job 1 stopped by the stall rule"), said[-3000:]
    assert took < 50, took
    assert tagged_pids(f"{uid}.") == []

    events = json.loads(run_cli("events", "st", "--json").stdout)
    stalls = [e for e in events if e["kind"] == "stall"]
    # the controller's decision, and the agent's verdict with its evidence
    assert any("stopping the job" in e["message"] for e in stalls), stalls
    assert any(
        e["node"] == 0 and "no progress (step or log) for 3s" in e["message"] for e in stalls
    ), stalls
    assert run_cli("down", "st", "--yes").returncode == 0
