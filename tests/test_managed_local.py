"""Managed jobs on the local provider through the real `mlcloud` process (the torchrun
stand-in): a job that succeeds is pulled and its cluster downed; a failing script is not
restarted (unless on_failure: restart); every node lost moves the job to NAME-2, which resumes
from the checkpoint dir's bucket stand-in; `launch` killed with -9 and run again adopts the job
(no second cluster); cancel leaves nothing; `jobs --json` tells the story; a bad input is one
line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import MLCLOUD, run_cli, tagged_pids, wait_for

pytestmark = pytest.mark.e2e

# prints its steps; exits with $CODE once $GATE exists (if set) and after $STEPS steps
JOB = """\
import os, sys, time
for step in range(int(os.environ.get("STEPS", "3"))):
    print(f"step {step}", flush=True)
    time.sleep(0.1)
while os.environ.get("GATE") and not os.path.exists(os.environ["GATE"]):
    time.sleep(0.05)
out = os.environ["MLCLOUD_OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "result.txt"), "w").write("ok")
sys.exit(int(os.environ.get("CODE", "0")))
"""


@pytest.fixture
def project(tmp_path) -> Path:
    p = tmp_path / "proj"
    p.mkdir()
    (p / "job.py").write_text(JOB)
    return p


def jobs() -> dict:
    r = run_cli("jobs", "--json")
    assert r.returncode == 0, r.stderr
    return {j["name"]: j for j in json.loads(r.stdout)["jobs"]}


def leftovers(name: str) -> list[int]:
    """The processes still running for any cluster the managed job made."""
    return [pid for c in jobs()[name]["clusters"] for pid in tagged_pids(f"{c['uid']}.")]


def clusters() -> list[str]:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return [c["name"] for c in json.loads(r.stdout)["clusters"]]


def test_a_job_that_succeeds_is_pulled_and_its_cluster_downed(project, tmp_path):
    dest = tmp_path / "results"
    r = run_cli("launch", "ok", "-w", str(project), f"--pull={dest}", "job.py", "--yes", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 2" in r.stderr  # the job's output: stdout holds the JSON document
    said = json.loads(r.stdout)
    assert (said["cluster"], said["status"], said["managed"]["status"]) == (
        "ok-1",
        "SUCCEEDED",
        "SUCCEEDED",
    )
    assert (dest / "node0" / "result.txt").read_text() == "ok"
    assert clusters() == []
    j = jobs()["ok"]
    assert (j["status"], j["exit_code"], j["restarts"]) == ("SUCCEEDED", 0, 0)
    assert [(c["cluster"], c["where"], c["why"]) for c in j["clusters"]] == [
        ("ok-1", "local", "job ended")
    ]
    r = run_cli("jobs")
    assert r.returncode == 0 and "ok: SUCCEEDED (exit 0), 0 restart(s)" in r.stdout, r.stdout
    assert "ok-1" in r.stdout and "job ended" in r.stdout
    r = run_cli("status", "ok")  # an ended managed job: its story
    assert r.returncode == 0 and "ok-1" in r.stdout, r.stdout + r.stderr
    r = run_cli("logs", "ok")  # its last cluster's job, though the cluster is gone
    assert r.returncode == 0 and "step 2" in r.stdout, r.stdout + r.stderr


def test_a_failing_script_is_not_restarted(project, monkeypatch):
    monkeypatch.setenv("CODE", "7")
    r = run_cli(
        "launch", "bad", "-w", str(project), "job.py", "--yes", "-e", "CODE", cwd=project.parent
    )
    assert r.returncode == 7, r.stdout + r.stderr
    j = jobs()["bad"]
    assert (j["status"], j["exit_code"], j["restarts"], len(j["clusters"])) == ("FAILED", 7, 0, 1)
    assert clusters() == [] and not leftovers("bad")


def _cluster(name: str) -> dict | None:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return next((c for c in json.loads(r.stdout)["clusters"] if c["name"] == name), None)


def _running(name: str) -> bool:
    c = _cluster(name)
    return bool(c and c["jobs"] and c["jobs"][-1]["status"] == "RUNNING")


def _launch(project: Path, name: str, gate: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, GATE=str(gate))
    return subprocess.Popen(
        [MLCLOUD, "launch", name, "-w", str(project), "--yes", "-e", "GATE", *args, "job.py"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=project.parent,  # its outputs land in ./mlcloud-results/NAME/
    )


def test_every_node_lost_moves_the_job_to_a_new_cluster(project, tmp_path):
    gate = tmp_path / "gate"
    p = _launch(project, "mv", gate)
    follow = None
    try:
        wait_for(lambda: _running("mv-1"), what="the job on mv-1")
        follow = subprocess.Popen(  # across the move, to the managed job's end
            [MLCLOUD, "logs", "mv", "--follow"], stdout=subprocess.PIPE, text=True
        )
        assert follow.stdout.readline() == "[mlcloud] mv-1 job 1\n"  # it follows mv-1 now
        uid = _cluster("mv-1")["uid"]
        for pid in tagged_pids(f"{uid}."):  # a local node has no machine to lose: its job's
            os.kill(pid, signal.SIGKILL)  # processes go, and it reads as a lost node
        wait_for(lambda: _running("mv-2") or p.poll() is not None, what="the job on mv-2")
        assert p.poll() is None, p.communicate()[0]
        wait_for(lambda: _cluster("mv-1") is None, what="mv-1 torn down")
        gate.touch()
        out, _ = p.communicate(timeout=60)
        followed, _ = follow.communicate(timeout=60)
    finally:
        p.kill()
        if follow is not None:
            follow.kill()
    assert p.returncode == 0, out
    assert follow.returncode == 0, followed
    assert "[mlcloud] mv-2 job 1" in followed and "succeeded" in followed, followed
    logged = run_cli("logs", "mv").stdout  # every cluster's job, in order
    assert logged.startswith("[mlcloud] mv-1 job 1\n[node0] step 0\n"), logged
    assert "\n[mlcloud] mv-2 job 1\n[node0] step 0\n" in logged, logged
    j = jobs()["mv"]
    assert (j["status"], j["restarts"]) == ("SUCCEEDED", 1)
    # no bucket: mv-2 began again at "step 0", whatever step mv-1 had reached
    on_mv1 = logged.split("[mlcloud] mv-2 job 1\n")[0]
    assert j["steps_lost"] == max(int(n) for n in re.findall(r"\] step (\d+)", on_mv1))
    assert [(c["cluster"], c["why"]) for c in j["clusters"]] == [
        ("mv-1", "every node lost"),
        ("mv-2", "job ended"),
    ]
    r = run_cli("events", "mv")
    assert "mv-1: " in r.stdout and "recover" in r.stdout and "moved" in r.stdout, r.stdout
    assert clusters() == [] and not leftovers("mv")
    assert (tmp_path / "mlcloud-results" / "mv" / "mv-2" / "node0" / "result.txt").exists()


def test_launch_killed_and_run_again_adopts_the_job(project, tmp_path):
    gate = tmp_path / "gate"
    p = _launch(project, "re", gate)
    wait_for(lambda: _running("re-1"), what="the job on re-1")
    r = run_cli("launch", "re", "job.py", "--yes")  # a second watcher is refused
    assert r.returncode == 1 and f"watched by {p.pid}@" in r.stderr, r.stderr
    p.kill()  # -9: the watcher is gone (its lead with it), the job runs on
    p.wait()
    again = _launch(project, "re", gate)
    try:
        wait_for(lambda: jobs()["re"]["watcher"].startswith(f"{again.pid}@"), what="the adoption")
        gate.touch()
        out, _ = again.communicate(timeout=60)
    finally:
        again.kill()
    assert again.returncode == 0, out
    assert "resuming managed job re" in out
    j = jobs()["re"]
    assert (j["status"], [c["cluster"] for c in j["clusters"]]) == ("SUCCEEDED", ["re-1"])
    assert clusters() == [] and not leftovers("re")


def test_cancel_stops_the_job_and_downs_its_clusters(project, tmp_path):
    p = _launch(project, "cx", tmp_path / "never")
    try:
        wait_for(lambda: _running("cx-1"), what="the job on cx-1")
        r = run_cli("cancel", "cx")
        assert r.returncode == 0, r.stderr
        assert "managed job cx: CANCELLED" in r.stdout
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode != 0, out
    assert jobs()["cx"]["status"] == "CANCELLED"
    assert clusters() == [] and not leftovers("cx")


def test_sigterm_on_launch_stops_the_job_and_downs_its_clusters(project, tmp_path):
    p = _launch(project, "tm", tmp_path / "never")
    try:
        wait_for(lambda: _running("tm-1"), what="the job on tm-1")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=90)
    finally:
        p.kill()
    assert p.returncode == 130, out
    assert jobs()["tm"]["status"] == "CANCELLED"
    assert clusters() == [] and not leftovers("tm")


def test_bad_inputs_are_one_line(project, tmp_path):
    r = run_cli("launch", "Bad_Name", "job.py", "--yes")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = run_cli("launch", "dt", "-w", str(project), "--detach", "job.py", "--yes")
    assert r.returncode == 2 and "shared store" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("launch", "a" * 35, "-w", str(project), "job.py", "--yes")  # no room for -K
    assert r.returncode == 2 and "at most 34" in r.stderr and r.stderr.count("\n") == 1
    spec = tmp_path / "s.yaml"
    spec.write_text("recover:\n  on_failure: retry\n")
    r = run_cli("launch", "sp", "-f", str(spec), "-w", str(project), "job.py", "--yes")
    assert r.returncode == 2 and "recover.on_failure" in r.stderr, r.stderr
    spec.write_text(  # a region the catalog has no offer in: refused before any cloud call
        "provider: aws\nresources: {instance_type: g5.xlarge}\n"
        "recover: {placements: ['aws:mars-1']}\n"
    )
    r = run_cli("launch", "sp", "-f", str(spec), "-w", str(project), "job.py", "--yes")
    assert r.returncode == 2 and "recover.placements: 'aws:mars-1'" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert jobs() == {} and clusters() == []


def test_detach_hands_the_watch_to_autoscale_all(project, tmp_path, pg_url):
    gate = tmp_path / "gate"
    r = run_cli(
        "launch", "dt", "-w", str(project), "--yes", "-e", f"GATE={gate}", "--detach", "job.py"
    )
    assert r.returncode == 0, r.stderr
    assert jobs()["dt"]["watcher"] == "autoscale"
    service = subprocess.Popen(
        [MLCLOUD, "autoscale", "--all", "--interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    try:
        gate.touch()
        wait_for(lambda: jobs()["dt"]["status"] == "SUCCEEDED", what="the job's end")
        wait_for(lambda: clusters() == [], what="its clusters down")
    finally:
        service.terminate()
        service.wait(60)
    assert (tmp_path / "mlcloud-results" / "dt" / "dt-1" / "node0" / "result.txt").exists()
    assert not leftovers("dt")


def test_on_failure_restart_runs_it_again_up_to_max_restarts(project, monkeypatch):
    monkeypatch.setenv("CODE", "7")
    spec = project / "mlcloud.yaml"
    spec.write_text("recover: {on_failure: restart, max_restarts: 2}\n")
    r = run_cli(
        "launch", "rs", "-f", str(spec), "-w", str(project), "job.py", "--yes", "-e", "CODE",
        cwd=project.parent,
    )  # fmt: skip
    assert r.returncode == 7, r.stdout + r.stderr
    assert r.stdout.count("step 2") == 3  # the first run and two restarts
    j = jobs()["rs"]
    assert (j["status"], j["restarts"], len(j["clusters"])) == ("FAILED", 2, 1)
    said = run_cli("events", "rs").stdout
    assert said.count("on_failure: restart") == 2, said


@pytest.mark.real_torchrun  # an elastic size: the stand-in has no elastic rendezvous
def test_restarts_in_place_past_the_limit_move_the_job(project, tmp_path):
    spec = project / "mlcloud.yaml"
    spec.write_text(
        "nodes: '1:1'\nautoscale: {poll_seconds: 1}\nrecover: {max_restarts_in_place: 0}\n"
    )
    gate = tmp_path / "gate"
    p = _launch(project, "ip", gate, "-f", str(spec))
    try:
        wait_for(lambda: _running("ip-1"), what="the job on ip-1")
        uid = _cluster("ip-1")["uid"]
        for pid in tagged_pids(f"{uid}."):  # its job's processes gone: the controller restarts
            os.kill(pid, signal.SIGKILL)  # it in place, one more than the limit allows
        wait_for(lambda: _running("ip-2") or p.poll() is not None, 120, "the job on ip-2")
        assert p.poll() is None, p.communicate()[0]
        gate.touch()
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, out
    j = jobs()["ip"]
    assert [(c["cluster"], c["why"]) for c in j["clusters"]] == [
        ("ip-1", "restarts in place spent"),
        ("ip-2", "job ended"),
    ]
    assert j["restarts"] >= 2  # in place (each the controller's event), and the new cluster
    assert "recover.max_restarts_in_place (0) spent" in run_cli("events", "ip").stdout
    assert clusters() == [] and not leftovers("ip")
