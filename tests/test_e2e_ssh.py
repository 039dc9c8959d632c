"""End to end over real OpenSSH nodes (the ssh provider): up -> train (2 x 2, gloo) -> logs ->
a node lost mid-job gives a clear failure -> down leaves no process; setup runs once; the
interactive shell; injection attempts never run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MLCLOUD, run_cli, ssh_up_args, tagged_pids

pytestmark = pytest.mark.e2e


def status() -> dict:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def project(tmp_path) -> Path:
    assert run_cli("init", str(tmp_path / "proj")).returncode == 0
    return tmp_path / "proj"


@pytest.mark.real_torchrun
def test_ssh_cluster_train_lose_node_down(make_ssh_nodes, project, tmp_path):
    nodes = make_ssh_nodes(2)
    r = run_cli(*ssh_up_args(nodes, "lab"))
    assert r.returncode == 0, r.stderr
    c = status()["clusters"][0]
    assert c["provider"] == "ssh" and [n["ip"] for n in c["nodes"]] == nodes.hosts
    uid = c["uid"]

    spec = project / "mlcloud.yaml"
    spec.write_text(spec.read_text() + "setup: echo setting-up-$MLCLOUD_SETUP_PROBE\n")
    r = run_cli("train", "lab", "-f", str(spec), "--", "--steps", "30")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert sorted(int(m) for m in re.findall(r"\] rank (\d)/4 ", r.stdout)) == [0, 1, 2, 3]
    assert r.stdout.count("setting-up") == 2  # once per node
    assert "done steps=30 world_size=4" in r.stdout
    r = run_cli("logs", "lab")
    assert r.returncode == 0 and "done steps=30 world_size=4" in r.stdout

    # setup is cached per node; a changed file is the only one sent again
    (project / "extra.py").write_text("x = 1\n")
    r = run_cli("train", "lab", "-f", str(spec), "--", "--steps", "40")
    assert r.returncode == 0, r.stderr
    assert "setting-up" not in r.stdout
    assert "synced: 2 file(s)" in r.stderr  # extra.py, to each of 2 nodes

    # lose node1 (its sshd and every process it started) in the middle of a job
    r = run_cli("train", "lab", "-f", str(spec), "--detach", "--", "--steps", "1000000")
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 60
    while time.time() < deadline and "step 100 " not in run_cli("logs", "lab").stdout:
        time.sleep(0.5)
    nodes.kill(1)
    r = run_cli("logs", "lab", "--follow", timeout=120)
    assert r.returncode != 0
    assert re.search(r"job 3 failed: node1: .*(lost contact|killed)", r.stdout), r.stdout[-2000:]
    assert tagged_pids(f"{uid}.0.") == []  # node0's part was stopped

    # down while node1 is unreachable: a clear error, the cluster is kept for a retry
    r = run_cli("down", "lab", "--yes")
    assert r.returncode == 1 and "run `mlcloud down` again" in r.stderr
    assert "Traceback" not in r.stderr
    assert status()["clusters"][0]["status"] == "STOPPING"
    nodes.restart(1)
    r = run_cli("down", "lab", "--yes")
    assert r.returncode == 0, r.stderr
    assert status()["clusters"] == [] and tagged_pids(f"{uid}.") == []
    assert not list((Path.home() / ".mlcloud").glob(f"{uid}*"))


def test_down_purge_forgets_a_host_gone_for_good(make_ssh_nodes):
    nodes = make_ssh_nodes(2)
    assert run_cli(*ssh_up_args(nodes, "gone")).returncode == 0
    uid = status()["clusters"][0]["uid"]
    nodes.kill(1)
    r = run_cli("down", "gone", "--yes", "--purge")
    assert r.returncode == 0 and "--purge" in r.stderr
    assert "is forgotten; its nodes were not all confirmed gone" in r.stderr
    assert "no node left" not in r.stderr  # node1's directory is still there
    assert status()["clusters"] == []
    assert [p.name for p in (Path.home() / ".mlcloud" / uid).iterdir()] == ["node-1"]
    shutil.rmtree(Path.home() / ".mlcloud" / uid)  # what --purge said to check by hand


def test_interactive_shell_starts_in_the_workdir(make_ssh_nodes):
    nodes = make_ssh_nodes(2)
    assert run_cli(*ssh_up_args(nodes, "sh")).returncode == 0
    r = subprocess.run(
        [MLCLOUD, "ssh", "sh", "--node", "1"],
        input="echo at=$PWD; exit\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"at=.*/node-1/workdir", r.stdout)
    assert run_cli("ssh", "sh", "--node", "5").returncode == 2
    assert run_cli("down", "sh", "--yes").returncode == 0


PAYLOADS = [
    "a;touch {c}",
    "$(touch {c})",
    "`touch {c}`",
    "'; touch {c}; '",
    '"; touch {c}; "',
    "x\ntouch {c}\n",
    "$HOME && touch {c}",
    "-rf {c} || touch {c}",
]


def test_injection_battery_never_runs(make_ssh_nodes, tmp_path):
    canary = tmp_path / "CANARY"
    payloads = [p.format(c=canary) for p in PAYLOADS]
    work = tmp_path / "$(touch CANARY) `touch CANARY`; touch CANARY"
    work.mkdir()
    (work / "echo.py").write_text(
        "import json, os, sys\n"
        "if os.environ['RANK'] == '0':\n"
        "    print('ARGS=' + json.dumps(sys.argv[1:]))\n"
        "    print('ENVS=' + json.dumps({k: os.environ[k] for k in sorted(os.environ)"
        " if k.startswith('EVIL')}))\n"
    )
    (work / "$(touch CANARY).py").write_text("")  # a hostile file name travels, harmlessly
    nodes = make_ssh_nodes(2)
    assert run_cli(*ssh_up_args(nodes, "inj")).returncode == 0
    envs = [f"EVIL{i}={p}" for i, p in enumerate(payloads)] + ["TOKEN=s3cr3t-do-not-log"]
    args = [a for e in envs for a in ("--env", e)]
    r = run_cli("train", "inj", "-w", str(work), *args, "echo.py", "--", *payloads)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    got = json.loads(re.search(r"ARGS=(.*)", r.stdout)[1])
    assert got == payloads  # every argument arrived verbatim
    got_env = json.loads(re.search(r"ENVS=(.*)", r.stdout)[1])
    assert got_env == {f"EVIL{i}": p for i, p in enumerate(payloads)}
    # secrets travel in a 0600 file, never in a command line or the job log
    uid = status()["clusters"][0]["uid"]
    jobs = list((Path.home() / ".mlcloud").glob(f"{uid}/node-0/jobs/1/job.json"))
    assert jobs and jobs[0].stat().st_mode & 0o077 == 0
    job = status()["clusters"][0]["jobs"][0]
    assert "s3cr3t" not in Path(job["log"]).read_text() + job["command"]
    assert "s3cr3t" in jobs[0].read_text()
    r = run_cli("exec", "inj", "--", "ls", payloads[1])  # several words: each one quoted
    assert "No such file" in r.stderr
    assert run_cli("down", "inj", "--yes").returncode == 0
    leftovers = [
        p for p in [canary, *Path.home().glob("CANARY"), *tmp_path.rglob("CANARY")] if p.exists()
    ]
    assert leftovers == []


def test_cancel_names_an_unreachable_node_once(make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(2)
    assert run_cli(*ssh_up_args(nodes, "cu")).returncode == 0
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "nap.py").write_text("import time\ntime.sleep(30)\n")
    r = run_cli("train", "cu", "-w", str(tmp_path / "w"), "nap.py", "--detach")
    assert r.returncode == 0, r.stderr
    nodes.kill(1)
    r = run_cli("cancel", "cu", "--grace", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert "node1 (" in line and "node1 (node1" not in line, line
    run_cli("down", "cu", "--yes", "--purge")
