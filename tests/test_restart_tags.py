"""A job restarted with a new head (the controller's restart of an elastic job) runs in the
same job directory as its first run, under a tag that names its rendezvous: the first run's
reaper, which kills what its waiter left behind, may wake only after the restart (a loaded
node) and must not take the new run's processes for its own. The controller's stop, then
reset, then start are played here with node_ctl, the reaper held stopped meanwhile."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from conftest import tagged_pids

from mlcloud import state, templates
from mlcloud.jobs import launch
from mlcloud.provision.handle import Handle

CTL = str(templates.path("node_ctl.py"))


def ctl(*args: str) -> None:
    subprocess.run([sys.executable, CTL, *args], check=True, capture_output=True, timeout=60)


def _handle(uid: str) -> Handle:
    node = state.NodeRecord(0, "h0", "10.0.0.1", "10.0.0.1", "/r/node-1", 0, None, "running", "")
    rec = state.ClusterRecord("c", uid, "ssh", "UP", {"nodes": "1:2"}, "o", 0, 0, (node,))
    return Handle(rec, None, None, [SimpleNamespace(python=sys.executable)])


def _reaper(jobdir: str) -> int:
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"_reap" in cmd and jobdir.encode() in cmd:
            return int(entry)
    raise AssertionError("no reaper")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _start(jobdir: Path, tag: str) -> None:
    spec = {"argv": ["sleep", "600"], "cwd": str(jobdir), "env": {}, "tag": tag}
    (jobdir / "job.json").write_text(json.dumps(spec))
    ctl("start", str(jobdir))


def test_a_late_reaper_of_the_first_run_spares_the_restarted_run(tmp_path):
    h = _handle(f"rt{secrets.token_hex(4)}")
    req = launch.JobRequest(tmp_path, "train.py", (), None, {}, None, None)
    first, second = (launch.node_job(h, req, 1, 0, 29500, 1, rdzv=r)["tag"] for r in (0, 1))
    everything = launch.node_tag(h, 0, 1)  # what the controller's stop kills
    jd = tmp_path / "jobs" / "1"
    jd.mkdir(parents=True)
    _start(jd, first)
    reaper = _reaper(str(jd))
    asleep = 0  # in its wait for the waiter (it read the waiter's pid): seen sleeping 3 times
    while asleep < 3:
        asleep = asleep + 1 if _state(reaper) == "S" else 0
        time.sleep(0.1)
    os.kill(reaper, signal.SIGSTOP)  # a node too busy to run it for now
    try:
        ctl("kill", everything, "1")  # the controller stops the first run...
        for name in ("exit_code", "waiter.pid"):  # ...resets the job directory...
            (jd / name).unlink(missing_ok=True)
        _start(jd, second)  # ...and starts the job again, with a new rendezvous
        assert tagged_pids(second)
    finally:
        os.kill(reaper, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while _state(reaper) not in ("Z", "gone") and time.monotonic() < deadline:
        time.sleep(0.1)  # it reaps what its own run left, if anything, and ends
    try:
        assert tagged_pids(second), "the first run's reaper killed the restarted run"
    finally:
        ctl("kill", everything, "1")
    assert tagged_pids(everything) == []
