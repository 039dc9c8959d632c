"""End to end on the local provider, through the real `mlcloud` process and real torchrun:
up 2 nodes -> train (world size 4) -> kill -9 one node mid-run -> train resumes from the last
checkpoint -> down leaves no process and no row."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MLCLOUD, run_cli, tagged_pids

pytestmark = pytest.mark.e2e


def status() -> dict:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def newest_checkpoint(home: Path, uid: str) -> int:
    steps = [
        int(p.stem.split("-")[1])
        for p in (home / "local" / uid).glob("node-*/checkpoints/ckpt-*.pt")
    ]
    return max(steps, default=0)


def train_2x2(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`mlcloud train e2e` on the project with 2 processes per node."""
    return run_cli("train", "e2e", "-w", str(project), "--nproc-per-node", "2", *args)


@pytest.fixture
def project(tmp_path) -> Path:
    r = run_cli("init", str(tmp_path / "proj"))
    assert r.returncode == 0, r.stderr
    return tmp_path / "proj"


@pytest.mark.real_torchrun
def test_up_train_kill_resume_down(project, mlcloud_home):
    r = run_cli("up", "e2e", "--nodes", "2", "--yes")
    assert r.returncode == 0, r.stderr
    uid = status()["clusters"][0]["uid"]

    # 1. a full job: every rank of 2 nodes x 2 processes reports, loss falls
    r = train_2x2(
        project, "train.py", "--", "--steps", "40", "--ckpt-every", "10", "--log-every", "10"
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    ranks = sorted(int(m) for m in re.findall(r"\] rank (\d)/4 ", r.stdout))
    assert ranks == [0, 1, 2, 3]
    assert {"[node0]", "[node1]"} <= {line.split()[0] for line in r.stdout.splitlines()}
    losses = [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", r.stdout)]
    assert losses[-1] < losses[0]
    assert "done steps=40 world_size=4" in r.stdout

    # 2. a long job, detached; kill -9 every process of node1 once checkpoints exist
    r = train_2x2(project, "--detach", "train.py", "--", "--steps", "1000000", "--ckpt-every", "20")
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 90
    while newest_checkpoint(mlcloud_home, uid) < 100 and time.time() < deadline:
        time.sleep(0.2)
    assert newest_checkpoint(mlcloud_home, uid) >= 100
    victims = tagged_pids(f"{uid}.1.")
    assert victims
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    r = run_cli("logs", "e2e", "--follow", timeout=120)
    assert r.returncode != 0
    assert re.search(r"job 2 failed: node1: its processes were killed", r.stdout), r.stdout[-2000:]
    job = status()["clusters"][0]["jobs"][-1]
    assert job["status"] == "FAILED" and job["exit_code"] != 0
    assert tagged_pids(f"{uid}.") == []  # the surviving node was stopped too

    # 3. train again: resumes from the newest checkpoint any node holds, not from 0
    last = newest_checkpoint(mlcloud_home, uid)
    r = train_2x2(project, "train.py", "--", "--steps", str(last + 20), "--ckpt-every", "10")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert f"resumed from step {last}" in r.stdout
    assert f"done steps={last + 20} world_size=4" in r.stdout

    # 4. down: nothing left running, no row, no node directory
    r = run_cli("down", "e2e", "--yes")
    assert r.returncode == 0, r.stderr
    assert status()["clusters"] == []
    assert tagged_pids(f"{uid}.") == []
    assert not (mlcloud_home / "local" / uid).exists()
    r = run_cli("down", "e2e", "--yes")  # harmless the second time, and said: not_found
    assert r.returncode == 1 and "no cluster named 'e2e'" in r.stderr, r.stderr


def test_racing_up_makes_one_cluster(mlcloud_home):
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [MLCLOUD, "up", "race", "--nodes", "2", "--yes"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    clusters = status()["clusters"]
    assert len(clusters) == 1 and clusters[0]["num_nodes"] == 2
    assert len(list((mlcloud_home / "local").iterdir())) == 1
    assert any("already up" in err for _, err in outs)
    assert run_cli("down", "race", "--yes").returncode == 0


def test_failed_job_with_down_tears_down(project, mlcloud_home):
    (project / "fail.py").write_text(
        "import sys\nprint('about to fail', flush=True)\nsys.exit(3)\n"
    )
    assert run_cli("up", "doomed", "--nodes", "2").returncode == 0
    r = run_cli("train", "doomed", "-w", str(project), "--down", "fail.py")
    assert r.returncode != 0
    assert "about to fail" in r.stdout and "job 1 failed" in r.stdout
    assert status()["clusters"] == []
    r = run_cli("logs", "doomed")  # the log outlives the cluster
    assert r.returncode == 0 and "about to fail" in r.stdout


def test_exec_on_every_node(mlcloud_home):
    assert run_cli("up", "ex", "--nodes", "2").returncode == 0
    r = run_cli("exec", "ex", "--", "echo hi from $(basename $(dirname $PWD))")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[node0] hi from node-0", "[node1] hi from node-1"]
    r = run_cli("exec", "ex", "--", "test", "-e", "nothing-here")
    assert r.returncode == 1 and "node0 (exit 1)" in r.stderr
    assert run_cli("down", "ex", "--yes").returncode == 0


def test_sigterm_on_train_with_down_stops_job_and_cluster(project, mlcloud_home):
    assert run_cli("up", "stopme", "--nodes", "2").returncode == 0
    uid = status()["clusters"][0]["uid"]
    proc = subprocess.Popen(
        [
            MLCLOUD,
            "train",
            "stopme",
            "-w",
            str(project),
            "--down",
            "train.py",
            "--",
            "--steps",
            "1000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    deadline = time.time() + 60
    while newest_checkpoint(mlcloud_home, uid) < 50 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what a CI runner sends when a pipeline is cancelled
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    assert "stopping the job on every node" in out
    assert status()["clusters"] == []
    assert tagged_pids(f"{uid}.") == []


def test_a_job_nobody_follows_any_more_is_reported(project, mlcloud_home):
    assert run_cli("up", "orphan", "--nodes", "1").returncode == 0
    r = run_cli(
        "train", "orphan", "-w", str(project), "--detach", "train.py", "--", "--steps", "1000000"
    )
    assert r.returncode == 0, r.stderr
    job = status()["clusters"][0]["jobs"][0]
    assert job["followed"] is True
    with sqlite3.connect(mlcloud_home / "state.db") as db:
        (driver,) = db.execute("SELECT driver_pid FROM jobs").fetchone()
    os.kill(driver, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and status()["clusters"][0]["jobs"][0]["followed"]:
        time.sleep(0.1)
    assert status()["clusters"][0]["jobs"][0]["followed"] is False
    # no longer followed: the nodes tell its output, and it can still be stopped
    deadline = time.time() + 60
    while "step 10 " not in (r := run_cli("logs", "orphan", timeout=30)).stdout:
        assert r.returncode == 0 and time.time() < deadline, r.stdout + r.stderr
        time.sleep(0.5)
    assert "rank 0/1" in r.stdout
    r = run_cli("cancel", "orphan", "--grace", "5", timeout=60)
    assert r.returncode == 0 and "cancelled" in r.stdout, r.stderr
    assert status()["clusters"][0]["jobs"][0]["status"] == "CANCELLED"
    uid = status()["clusters"][0]["uid"]
    assert run_cli("down", "orphan", "--yes").returncode == 0
    assert tagged_pids(f"{uid}.") == []


def test_a_job_pulled_before_anyone_read_its_end_counts_as_pulled(project, mlcloud_home):
    """Its driver gone, a job's end is read from the nodes later (by `status` here): the end
    is when it ended there, so the pull made in between still counts."""
    assert run_cli("up", "late", "--nodes", "1").returncode == 0
    r = run_cli("train", "late", "-w", str(project), "--detach", "train.py", "--", "--steps", "5")
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(mlcloud_home / "state.db") as db:
        (driver,) = db.execute("SELECT driver_pid FROM jobs").fetchone()
    os.kill(driver, signal.SIGKILL)
    uid = status()["clusters"][0]["uid"]
    ended = next((mlcloud_home / "local" / uid).glob("node-0/jobs/1")) / "exit_code"
    deadline = time.time() + 60
    while not ended.exists():
        assert time.time() < deadline, "the job did not end"
        time.sleep(0.2)
    r = run_cli("pull", "late", str(mlcloud_home.parent / "results"))
    assert r.returncode == 0, r.stderr
    assert status()["clusters"][0]["jobs"][0]["status"] == "SUCCEEDED"  # read now, after the pull
    r = run_cli("down", "late", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    assert [c.get("unpulled_job") for c in json.loads(r.stdout)["clusters"]] == [None]
