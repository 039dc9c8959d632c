"""The node agent end to end on the local provider, with no controller running: the idle
teardown and the budget stop are the nodes' own doing, through the real `mlcloud` process,
real torchrun and the DDP template."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MLCLOUD, SLOW_TRAIN, run_cli, ssh_up_args, tagged_pids

from mlcloud.provision import lifecycle

pytestmark = pytest.mark.e2e

IDLE_S, POLL_S = 4.0, 1.0
SLACK_S = 2.0  # scheduling on a loaded test machine


def _node_root(home: Path, uid: str, i: int = 0) -> Path:
    return home / "local" / uid / f"node-{i}"


def _wait_for(path: Path, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear within {timeout}s")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _uid(name: str) -> str:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return next(c["uid"] for c in json.loads(r.stdout)["clusters"] if c["name"] == name)


def test_idle_teardown_only_after_the_job(tmp_path, mlcloud_home):
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text(f"autoscale:\n  idle_minutes: {IDLE_S / 60}\n  poll_seconds: {POLL_S}\n")
    project = tmp_path / "proj"
    project.mkdir()
    job_s = 2 * IDLE_S + 1
    (project / "job.py").write_text(
        f"import time\ntime.sleep({job_s})\nprint('job done', flush=True)\n"
    )
    # the job must start within IDLE_S of `up`: no other command in between (uid from --json)
    r = run_cli("up", "idle", "-f", str(spec), "--yes", "--json")
    assert r.returncode == 0, r.stderr
    uid = json.loads(r.stdout)["uid"]
    root = _node_root(mlcloud_home, uid)
    agent = int((root / "agent" / "agent.pid").read_text())
    assert _alive(agent)  # started at bootstrap

    # the job outlasts idle_minutes twice over: the node stays up while it runs
    r = run_cli("train", "idle", "-w", str(project), "job.py")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "job done" in r.stdout
    ended = (root / "jobs" / "1" / "exit_code").stat().st_mtime
    started = (root / "jobs" / "1" / "waiter.pid").stat().st_mtime
    assert ended - started > IDLE_S * 2
    stopped = _wait_for(root / "agent" / "stopped", IDLE_S + POLL_S + 10)
    assert stopped["kind"] == "idle_teardown"
    assert stopped["time"] > ended  # not while the job ran
    assert stopped["time"] - ended <= IDLE_S + POLL_S + SLACK_S, stopped["time"] - ended

    # the cluster's processes on the node are gone, the agent's included
    deadline = time.time() + 10
    while (tagged_pids(f"{uid}.") or _alive(agent)) and time.time() < deadline:
        time.sleep(0.2)
    assert tagged_pids(f"{uid}.") == [] and not _alive(agent)

    # its events say why; status shows the node terminated with the reason
    r = run_cli("events", "idle", "--json")
    assert r.returncode == 0, r.stderr
    events = json.loads(r.stdout)
    idle = [e for e in events if e["kind"] == "idle_teardown"]
    assert len(idle) == 1 and idle[0]["node"] == 0 and "idle for" in idle[0]["message"]
    assert idle[0]["time"].endswith("+00:00")
    r = run_cli("status", "idle")
    assert r.returncode == 0, r.stderr
    assert "terminated (idle_teardown" in r.stdout
    assert "(local, STOPPED: idle_teardown: idle for" in r.stdout
    r = run_cli("status", "idle", "--json")
    (cluster,) = json.loads(r.stdout)["clusters"]
    assert [n["status"] for n in cluster["nodes"]] == ["terminated"]
    assert cluster["status"] == "STOPPED" and cluster["reason"].startswith("idle_teardown:")
    r = run_cli("status", "--json")  # the list says so too, asking no node
    assert [c["status"] for c in json.loads(r.stdout)["clusters"]] == ["STOPPED"]
    r = run_cli("events", "idle", "--json")  # read again: nothing doubled
    assert len(json.loads(r.stdout)) == len(events)
    assert run_cli("down", "idle", "--yes").returncode == 0


def test_budget_stop_checkpoints_then_stops(tmp_path, mlcloud_home):
    """A fake price (36 $/h a node) and max_cost give a deadline 20 s out; the agent stops
    the job there with SIGTERM, and the template's final checkpoint is on disk."""
    from mlcloud import state
    from mlcloud.report import PlainReporter
    from mlcloud.spec.task import AutoscaleSpec, TaskSpec

    price, budget_s = 36.0, 20.0
    spec = TaskSpec(
        provider="local",
        autoscale=AutoscaleSpec(max_cost=price * budget_s / 3600, poll_seconds=POLL_S),
    )
    store = state.open_store()
    t0 = time.time()
    rec = lifecycle.up(store, "budget", spec, PlainReporter(quiet=True), price=price)
    root = _node_root(mlcloud_home, rec.uid)
    config = json.loads((root / "agent" / "config.json").read_text())
    assert abs(config["deadline"] - (t0 + budget_s)) < 5

    r = run_cli("init", str(tmp_path / "proj"))
    assert r.returncode == 0, r.stderr
    (tmp_path / "proj" / "slow.py").write_text(SLOW_TRAIN)  # paced: it runs until stopped
    # the machine that launched the job goes away (its driver, and with it the controller
    # `train` runs, is killed): the node's agent alone enforces the budget
    r = run_cli(
        "train",
        "budget",
        "--detach",
        "-w",
        str(tmp_path / "proj"),
        "slow.py",
        "--",
        "--steps",
        "100000000",
        "--ckpt-every",
        "500",
        "--log-every",
        "100",
    )
    assert r.returncode == 0, r.stderr
    driver = state.open_store().get_job("budget").driver_pid
    os.kill(driver, signal.SIGKILL)
    deadline = time.time() + budget_s + 60
    ended = root / "jobs" / "1" / "exit_code"
    while not (ended.exists() and (root / "agent" / "stopped").exists()):
        assert time.time() < deadline, "the agent did not stop the job at the deadline"
        time.sleep(0.2)
    stopped = json.loads((root / "agent" / "stopped").read_text())
    assert stopped["kind"] == "budget_stop"
    assert config["deadline"] <= stopped["time"] <= config["deadline"] + POLL_S + SLACK_S
    ckpts = sorted((root / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts and ckpts[-1].stat().st_mtime >= stopped["time"]  # saved on the SIGTERM
    # the job's end as its node tells it, read with no follower: `logs --follow` would run a
    # controller (max_cost is set), which would enforce the budget too and race the record
    r = run_cli("logs", "budget")
    assert "stopped by signal at step" in r.stdout, r.stdout[-2000:] + r.stderr
    (job,) = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["jobs"]
    assert job["exit_code"] == 143, job
    r = run_cli("events", "budget")
    assert "budget_stop" in r.stdout and "node0" in r.stdout
    assert tagged_pids(f"{rec.uid}.") == []
    assert run_cli("down", "budget", "--yes").returncode == 0


def test_one_agent_per_node_and_down_ends_it(mlcloud_home):
    r = run_cli("up", "one", "--nodes", "2", "--yes")
    assert r.returncode == 0, r.stderr
    uid = _uid("one")
    roots = [_node_root(mlcloud_home, uid, i) for i in (0, 1)]
    agents = [int((root / "agent" / "agent.pid").read_text()) for root in roots]
    assert len(set(agents)) == 2 and all(_alive(p) for p in agents)
    # starting it again (a rerun bootstrap) finds the one that runs
    again = subprocess.run(
        [sys.executable, str(roots[0] / "bin" / "agent.py"), "start", str(roots[0])],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(again.stdout) == agents[0]
    assert tagged_pids(f"{uid}.") == []  # untagged: stopping a job never reaches it
    assert run_cli("down", "one", "--yes").returncode == 0
    assert not any(_alive(p) for p in agents)


def test_ssh_node_stops_its_processes_and_status_reads_why_over_ssh(make_ssh_nodes, tmp_path):
    """On the ssh provider the switch stops the cluster's processes and never powers the host
    off; `status NAME` and `events` read the agent's files over SSH."""
    nodes = make_ssh_nodes(1)
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text(f"autoscale:\n  idle_minutes: {IDLE_S / 60}\n  poll_seconds: {POLL_S}\n")
    r = run_cli(*ssh_up_args(nodes, "lab"), "-f", str(spec))
    assert r.returncode == 0, r.stderr
    deadline = time.time() + IDLE_S + 20
    while time.time() < deadline:
        r = run_cli("status", "lab", "--json")
        assert r.returncode == 0, r.stderr
        if json.loads(r.stdout)["clusters"][0]["nodes"][0]["status"] == "terminated":
            break
        time.sleep(1)
    else:
        raise AssertionError("the idle ssh node never reported its stop")
    r = run_cli("events", "lab")
    assert r.returncode == 0 and "idle_teardown" in r.stdout and "node0" in r.stdout
    assert "stopping the cluster's processes" in r.stdout
    r = run_cli("exec", "lab", "--", "echo", "host-still-up")  # the host was not powered off
    assert "host-still-up" in r.stdout, r.stdout + r.stderr
    assert run_cli("down", "lab", "--yes").returncode == 0


def test_events_follow_prints_the_teardown_as_it_happens(tmp_path, mlcloud_home):
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text(f"autoscale:\n  idle_minutes: {IDLE_S / 60}\n  poll_seconds: {POLL_S}\n")
    r = run_cli("up", "watch", "-f", str(spec), "--yes")
    assert r.returncode == 0, r.stderr
    follow = subprocess.Popen(
        [MLCLOUD, "events", "watch", "--follow", "--json", "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        kinds = []
        deadline = time.time() + IDLE_S + 20
        while "idle_teardown" not in kinds and time.time() < deadline:
            line = follow.stdout.readline()
            if not line:
                break
            kinds.append(json.loads(line)["kind"])
        assert "up" in kinds and "idle_teardown" in kinds, kinds
        assert kinds.count("agent_start") == 1  # each event once, however often the nodes are read
    finally:
        follow.terminate()
        follow.wait(10)
    assert run_cli("down", "watch", "--yes").returncode == 0
