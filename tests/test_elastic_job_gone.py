"""An elastic job (`--nodes 1:2`) whose processes on one node are all killed while the node
itself still answers, with real torchrun (its exit barrier is the subject): `train`'s
controller counts the node as lost for the job, restarts the job from the newest checkpoint
and it finishes, long before torch's 300 s barrier; the controller's decision is an event;
torch's benign teardown noise stays in the log, not on the terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from conftest import MLCLOUD, SLOW_TRAIN, run_cli, tagged_pids

pytestmark = [pytest.mark.e2e, pytest.mark.real_torchrun]

STEPS, CKPT_EVERY = 30, 5


def test_an_elastic_job_survives_its_processes_killed_on_a_node(tmp_path, mlcloud_home):
    assert run_cli("init", str(tmp_path / "proj")).returncode == 0
    proj = tmp_path / "proj"
    (proj / "slow.py").write_text(SLOW_TRAIN)
    spec = proj / "mlcloud.yaml"
    spec.write_text(
        spec.read_text().replace("nproc_per_node: 2", "nproc_per_node: 1")
        + "autoscale:\n  poll_seconds: 1\n"
    )
    r = run_cli("up", "el", "-f", str(spec), "--nodes", "1:2", "--yes")
    assert r.returncode == 0, r.stderr
    uid = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["uid"]
    fast = tmp_path / "fast"
    log = tmp_path / "train.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [MLCLOUD, "train", "el", "slow.py", "-f", str(spec), "-e", f"SLOW_UNTIL={fast}",
             "--", "--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY), "--log-every", "5"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not re.search(rf"\] step {2 * CKPT_EVERY} loss", log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        victims = tagged_pids(f"{uid}.1.")
        assert victims
        for pid in victims:  # every process of node1's job; the node itself answers on
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + 60
        while "restarted on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        fast.touch()
        proc.wait(timeout=120)
        took = time.monotonic() - killed
        text = log.read_text()
        assert proc.returncode == 0, text[-4000:]
        assert took < 120, took  # not torch's 300 s exit barrier
        assert f"done steps={STEPS} world_size=2" in text, text[-4000:]
        assert re.search(r"resumed from step (\d+)", text), text[-4000:]
        # torch's teardown noise, if any came, is in the job's log only
        assert "frame #" not in text and "Failed to recv" not in text, text[-4000:]
        job = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["jobs"][0]
        assert job["status"] == "SUCCEEDED", job
        events = json.loads(run_cli("events", "el", "--json").stdout)
        restarts = [e["message"] for e in events if e["kind"] == "restart"]
        assert any("processes on node1" in m and "gone" in m for m in restarts), events
        assert tagged_pids(f"{uid}.") == []
    finally:
        if proc.poll() is None:
            proc.kill()
        assert run_cli("down", "el", "--yes").returncode == 0
