"""A job's truth comes from its nodes, through the real `mlcloud` process and real torchrun on
the local provider: the job's own exit code, a follower killed mid-run or mid-start, a busy
state database, a closed stdout, cancel, one job at a time, --json."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MLCLOUD, run_cli, tagged_pids, wait_for

pytestmark = pytest.mark.e2e

# Every rank prints its lines; rank 1 ends with $CODE (or kills itself with $SIGNAL), once the
# file $GATE names exists if it is set (the test looks at the job while it surely runs).
LINES = """\
import os, signal, sys, time
rank = int(os.environ["RANK"])
for i in range(int(os.environ.get("LINES", "6"))):
    print(f"rank {rank} line {i}", flush=True)
    time.sleep(float(os.environ.get("PAUSE", "0.3")))
while os.environ.get("GATE") and not os.path.exists(os.environ["GATE"]):
    time.sleep(0.05)
if rank == 1 and os.environ.get("SIGNAL"):
    os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
sys.exit(int(os.environ.get("CODE", "0")) if rank == 1 else 0)
"""


@pytest.fixture
def project(tmp_path) -> Path:
    p = tmp_path / "proj"
    p.mkdir()
    (p / "lines.py").write_text(LINES)
    return p


def jobs(name: str) -> list[dict]:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    found = [c for c in json.loads(r.stdout)["clusters"] if c["name"] == name]
    return found[0]["jobs"] if found else []


def up(name: str, nodes: int = 2) -> str:
    r = run_cli("up", name, "--nodes", str(nodes), "--yes")
    assert r.returncode == 0, r.stderr
    (c,) = [c for c in json.loads(run_cli("status", "--json").stdout)["clusters"]]
    return c["uid"]


def train(project: Path, name: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [MLCLOUD, "train", name, "-w", str(project), "--nproc-per-node", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ),
        **kw,
    )


def log_has(name: str, text: str) -> bool:
    found = jobs(name)
    log = Path(found[0]["log"]) if found else None
    return bool(log and log.exists() and text in log.read_text())


def running(name: str) -> bool:
    found = jobs(name)
    return bool(found) and found[0]["status"] == "RUNNING"


def test_the_first_failing_ranks_own_code_and_signal(project, mlcloud_home):
    up("codes")
    r = run_cli("train", "codes", "-w", str(project), "-e", "CODE=5", "lines.py")
    assert r.returncode == 5, r.stdout[-2000:] + r.stderr
    assert "rank 1: exited with 5" in r.stdout
    assert "[mlcloud] job 1 failed: node" in r.stdout
    assert jobs("codes")[-1]["exit_code"] == 5
    assert run_cli("logs", "codes", "--follow").returncode == 5

    r = run_cli("train", "codes", "-w", str(project), "-e", "SIGNAL=SIGKILL", "lines.py")
    assert r.returncode == 137, r.stdout[-2000:] + r.stderr
    assert "rank 1: killed by SIGKILL (exit 137)" in r.stdout
    assert run_cli("down", "codes", "--yes").returncode == 0


def test_train_killed_mid_run_the_nodes_tell_the_end(project, mlcloud_home, monkeypatch, tmp_path):
    monkeypatch.setenv("LINES", "12")
    up("k9")
    gate = tmp_path / "gate"
    proc = train(project, "k9", "-e", "CODE=7", "-e", "LINES", "-e", f"GATE={gate}", "lines.py")
    wait_for(lambda: log_has("k9", "rank 0 line 2"))
    proc.kill()
    proc.communicate()
    job = jobs("k9")[0]
    assert job["status"] == "RUNNING" and job["followed"] is False
    gate.touch()
    r = run_cli("logs", "k9", "--follow", timeout=120)
    assert r.returncode == 7, r.stdout[-2000:] + r.stderr
    for rank in (0, 1):  # the whole output, each line once
        for i in range(12):
            assert r.stdout.count(f"rank {rank} line {i}\n") == 1, r.stdout
    job = jobs("k9")[0]
    assert (job["status"], job["exit_code"]) == ("FAILED", 7)
    r = run_cli("logs", "k9")
    assert r.returncode == 0 and "rank 1 line 11" in r.stdout and "rank 0 line 0" in r.stdout
    assert run_cli("down", "k9", "--yes").returncode == 0


def test_status_reads_a_finished_job_from_the_nodes(project, mlcloud_home, tmp_path):
    up("st")
    gate = tmp_path / "gate"  # the job runs until the test has seen it running
    proc = train(project, "st", "-e", f"GATE={gate}", "lines.py")
    wait_for(lambda: running("st"))
    proc.kill()
    proc.communicate()
    gate.touch()
    wait_for(lambda: jobs("st")[0]["status"] == "SUCCEEDED", timeout=60)
    assert jobs("st")[0]["exit_code"] == 0
    r = run_cli("logs", "st")
    assert all(f"rank {k} line 5" in r.stdout for k in (0, 1)), r.stdout
    assert "job 1 succeeded" in r.stdout
    assert run_cli("down", "st", "--yes").returncode == 0


def test_train_killed_during_setup_is_reported_not_waited_on(project, mlcloud_home):
    (project / "mlcloud.yaml").write_text("setup: |\n  echo setting up\n  sleep 120\n")
    up("setup", nodes=1)
    proc = train(project, "setup", "-f", str(project / "mlcloud.yaml"), "lines.py")
    wait_for(lambda: log_has("setup", "setting up"))
    proc.kill()
    proc.communicate()
    start = time.time()
    r = run_cli("logs", "setup", "--follow", timeout=60)
    assert r.returncode == 1 and time.time() - start < 30
    assert "never started" in r.stdout
    assert jobs("setup")[0]["status"] == "FAILED"
    # the cluster is free again
    r = run_cli("train", "setup", "-w", str(project), "lines.py")
    assert r.returncode == 0, r.stderr
    assert run_cli("down", "setup", "--yes").returncode == 0


def test_a_busy_state_database_does_not_lose_the_end(project, mlcloud_home, monkeypatch):
    monkeypatch.setenv("LINES", "4")
    monkeypatch.setenv("MLCLOUD_DB_BUSY_TIMEOUT", "2")  # default 10 s: the same path, sooner
    uid = up("busy", nodes=1)
    gate = mlcloud_home.parent / "gate"  # the job runs until the test holds the database
    proc = train(project, "busy", "-e", "LINES", "-e", f"GATE={gate}", "lines.py")
    wait_for(lambda: running("busy"))
    db = sqlite3.connect(mlcloud_home / "state.db", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # the job ends while another writer holds the database
    gate.touch()
    try:
        # the job ends on its node (~1.2 s), then its write outwaits the busy timeout
        ended = mlcloud_home / "local" / uid / "node-0" / "jobs" / "1" / "exit_code"
        wait_for(ended.exists, timeout=60)
        time.sleep(2 + 1)
    finally:
        db.execute("ROLLBACK")
        db.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err
    assert "job 1 succeeded" in out
    job = jobs("busy")[0]
    assert (job["status"], job["exit_code"]) == ("SUCCEEDED", 0)
    assert run_cli("down", "busy", "--yes").returncode == 0


def test_closed_stdout_still_ends_the_job_and_goes_down(project, mlcloud_home):
    # `mlcloud train X --down | head -1`: the reader leaves after one line
    up("pipe")
    proc = train(project, "pipe", "--down", "lines.py")
    assert proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert "cluster pipe is down" in err
    assert jobs("pipe") == []
    r = run_cli("logs", "pipe")
    assert "rank 1 line 5" in r.stdout and "job 1 succeeded" in r.stdout


def test_closed_stdout_keeps_the_jobs_code_for_json_and_follow(project, mlcloud_home):
    # `train --json | true`, `logs --follow | true`: nobody reads, the exit code still tells
    up("gone", nodes=1)
    for argv in (
        [MLCLOUD, "train", "gone", "-w", str(project), "--json", "--nproc-per-node", "2"]
        + ["--env", "CODE=3", "lines.py"],
        [MLCLOUD, "logs", "gone", "--follow"],
    ):
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=dict(os.environ),
        )
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, (argv, err)  # rank 1's own code
        assert "Traceback" not in err and "BrokenPipe" not in err
    assert run_cli("down", "gone", "--yes").returncode == 0


def test_cancel_a_detached_job_whose_driver_is_gone(project, mlcloud_home):
    uid = up("cx")
    r = run_cli(
        "train", "cx", "-w", str(project), "--detach", "--json", "-e", "LINES=100000", "lines.py"
    )
    assert r.returncode == 0, r.stderr
    started = json.loads(r.stdout)
    assert (started["cluster"], started["job_id"], started["status"]) == ("cx", 1, "RUNNING")
    assert started["exit_code"] is None and started["log"].endswith(".log")
    # one job at a time
    r = run_cli("train", "cx", "-w", str(project), "lines.py")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: job 1 is still running on cx")
    with sqlite3.connect(mlcloud_home / "state.db") as db:
        (driver,) = db.execute("SELECT driver_pid FROM jobs").fetchone()
    os.kill(driver, signal.SIGKILL)
    wait_for(lambda: jobs("cx")[0]["followed"] is False, timeout=10)
    r = run_cli("cancel", "cx", "--grace", "5", "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["status"] == "CANCELLED" and done["exit_code"] not in (None, 0)
    assert tagged_pids(f"{uid}.") == []
    r = run_cli("logs", "cx", "--follow", timeout=30)
    assert r.returncode == done["exit_code"] and "job 1 cancelled" in r.stdout
    r = run_cli("cancel", "cx")
    assert r.returncode == 0 and "had already ended" in r.stdout
    assert run_cli("down", "cx", "--yes").returncode == 0


def test_cancel_a_followed_job(project, mlcloud_home):
    uid = up("cf", nodes=1)
    proc = train(project, "cf", "--json", "-e", "LINES=100000", "lines.py")
    wait_for(lambda: log_has("cf", "rank 0 line 1"))
    r = run_cli("cancel", "cf", "--grace", "5")
    assert r.returncode == 0 and "cancelled (CANCELLED" in r.stdout, r.stderr
    out, err = proc.communicate(timeout=60)
    result = json.loads(out)  # --json: only the result on stdout, the job's output on stderr
    assert result["status"] == "CANCELLED" and proc.returncode == result["exit_code"] != 0
    assert "[node0] rank 0 line 0" in err
    assert tagged_pids(f"{uid}.") == []
    assert run_cli("down", "cf", "--yes").returncode == 0


def test_a_cluster_made_again_shows_none_of_the_old_jobs(project, mlcloud_home):
    up("again", nodes=1)
    assert run_cli("train", "again", "-w", str(project), "lines.py").returncode == 0
    assert run_cli("down", "again", "--yes").returncode == 0
    up("again", nodes=1)
    assert jobs("again") == []
    r = run_cli("logs", "again")
    assert r.returncode == 1 and "no jobs on cluster 'again' yet" in r.stderr
    r = run_cli("logs", "again", "--job", "0")
    assert r.returncode == 1 and "no job 0 on cluster 'again'" in r.stderr
    r = run_cli("status", "again", "--json")
    assert json.loads(r.stdout)["clusters"][0]["jobs"] == []
    r = run_cli("cost", "--json")
    rows = [c for c in json.loads(r.stdout)["clusters"] if c["name"] == "again"]
    assert sorted(c["status"] for c in rows) == ["DOWN", "UP"]
    assert run_cli("down", "again", "--yes").returncode == 0


def test_exec_json_and_background_children(mlcloud_home):
    up("ex", nodes=2)
    start = time.time()
    r = run_cli("exec", "ex", "--json", "--", "echo hi; sleep 300 & echo $! > bg.pid", timeout=30)
    assert time.time() - start < 20
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cluster"] == "ex"
    assert [(n["node"], n["exit_code"], n["stdout"]) for n in out["nodes"]] == [
        (0, 0, "hi\n"),
        (1, 0, "hi\n"),
    ]
    for pidfile in mlcloud_home.glob("local/*/node-*/workdir/bg.pid"):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert run_cli("down", "ex", "--yes").returncode == 0


def test_env_from_the_local_environment_and_never_stored(project, mlcloud_home, monkeypatch):
    (project / "env.py").write_text("import os\nprint('token=' + os.environ['TOKEN'])\n")
    (project / "mlcloud.yaml").write_text("workdir: .\nenvs:\n  SPEC_SECRET: s3cr3t-in-spec\n")
    monkeypatch.setenv("TOKEN", "from-the-shell")
    up("envs", nodes=1)
    r = run_cli("train", "envs", "-f", str(project / "mlcloud.yaml"), "-e", "TOKEN", "env.py")
    assert r.returncode == 0, r.stderr
    assert "token=from-the-shell" in r.stdout
    held = [
        f
        for f in mlcloud_home.rglob("*")
        if f.is_file()
        and f.relative_to(mlcloud_home).parts[0] != "local"  # the node's own job.json
        and f.suffix != ".log"  # what the job printed
        and b"from-the-shell" in f.read_bytes()
    ]
    assert held == []
    monkeypatch.delenv("TOKEN")
    r = run_cli("train", "envs", "-w", str(project), "-e", "TOKEN", "env.py")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: --env TOKEN: TOKEN is not set in this environment; set it, or pass TOKEN=VALUE"
    )
    r = run_cli("up", "envs2", "-f", str(project / "mlcloud.yaml"), "--yes")
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(mlcloud_home / "state.db") as db:
        specs = [json.loads(s) for (s,) in db.execute("SELECT spec FROM clusters")]
    assert b"s3cr3t" not in (mlcloud_home / "state.db").read_bytes()
    assert ["SPEC_SECRET"] in [s["envs"] for s in specs]
    assert run_cli("down", "--all", "--yes").returncode == 0


def test_setup_larger_than_an_argument_list(project, mlcloud_home):
    filler = "# " + "x" * 1000 + "\n"
    script = "echo big setup ran\n" + filler * 200  # 200 KiB: over the 128 KiB argv limit
    (project / "mlcloud.yaml").write_text("workdir: .\nsetup: " + json.dumps(script) + "\n")
    up("big", nodes=1)
    r = run_cli("train", "big", "-f", str(project / "mlcloud.yaml"), "lines.py")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "big setup ran" in r.stdout
    assert run_cli("down", "big", "--yes").returncode == 0


def _listening(pids: list[int]) -> list[str]:
    """host:port of every TCP socket these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                host, port = cols[1].split(":")
                found.append(f"{host}:{int(port, 16)}")
    return found


@pytest.mark.real_torchrun  # torch's stores
def test_the_rendezvous_store_listens_on_the_node_address_only(project, mlcloud_home):
    uid = up("c10d", nodes=2)
    proc = train(project, "c10d", "-e", "LINES=100", "lines.py")
    wait_for(lambda: log_has("c10d", "rank 1 line 1"))
    listening = _listening(tagged_pids(f"{uid}."))
    proc.kill()
    proc.communicate()
    assert run_cli("cancel", "c10d", "--grace", "1").returncode == 0
    assert listening  # the store, and gloo's own sockets
    wildcard = {"00000000", "00000000000000000000000000000000"}
    assert [a for a in listening if a.split(":")[0] in wildcard] == []
    assert run_cli("down", "c10d", "--yes").returncode == 0


def test_over_ssh_a_killed_train_is_read_and_followed_from_the_nodes(
    make_ssh_nodes, project, mlcloud_home
):
    from conftest import ssh_up_args

    nodes = make_ssh_nodes(2)
    r = run_cli(*ssh_up_args(nodes, "sk"))
    assert r.returncode == 0, r.stderr
    gate = project.parent / "gate"
    proc = train(project, "sk", "-e", "CODE=6", "-e", "LINES=12", "-e", f"GATE={gate}", "lines.py")
    wait_for(lambda: log_has("sk", "rank 0 line 2"))
    proc.kill()
    proc.communicate()
    assert jobs("sk")[0]["followed"] is False
    gate.touch()
    r = run_cli("logs", "sk", "--follow", timeout=120)
    assert r.returncode == 6, r.stdout[-2000:] + r.stderr
    assert "rank 1: exited with 6" in r.stdout
    assert all(r.stdout.count(f"rank {k} line {i}\n") == 1 for k in (0, 1) for i in range(12))
    assert (jobs("sk")[0]["status"], jobs("sk")[0]["exit_code"]) == ("FAILED", 6)
    assert run_cli("down", "sk", "--yes").returncode == 0


def test_cancel_while_the_job_is_starting(project, mlcloud_home):
    (project / "mlcloud.yaml").write_text("workdir: .\nsetup: |\n  echo setting up\n  sleep 8\n")
    up("cs", nodes=1)
    proc = train(project, "cs", "-f", str(project / "mlcloud.yaml"), "lines.py")
    wait_for(lambda: log_has("cs", "setting up"))
    r = run_cli("cancel", "cs", "--grace", "1", "--json", timeout=90)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "CANCELLED"
    out, err = proc.communicate(timeout=60)
    # train and logs --follow give the same code for the same job: 130, cancelled without one
    assert proc.returncode == 130, err
    assert "job 1 cancelled before it started" in out and "error:" not in err, (out, err)
    assert jobs("cs")[0]["status"] == "CANCELLED"
    assert run_cli("logs", "cs", "--follow").returncode == 130
    assert run_cli("down", "cs", "--yes").returncode == 0
