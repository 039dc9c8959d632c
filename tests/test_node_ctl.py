"""The node-side controller: detached start, follow with the job's exit code, kill by tag."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import tagged_pids

from mlcloud import templates

CTL = str(templates.path("node_ctl.py"))


def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, CTL, *args], capture_output=True, text=True, timeout=timeout
    )


def job(tmp_path: Path, tag: str, script: str, env: dict | None = None) -> str:
    jd = tmp_path / "jobs" / "1"
    jd.mkdir(parents=True)
    (jd / "job.json").write_text(
        json.dumps(
            {
                "argv": ["bash", "-c", script],
                "cwd": str(tmp_path),
                "env": env or {},
                "tag": tag,
            }
        )
    )
    return str(jd)


def test_start_follow_exit_code_and_env(tmp_path):
    jd = job(tmp_path, "t1.0.1.", 'echo "hello $WHO"; echo err >&2; exit 3', {"WHO": "a b"})
    assert ctl("start", jd).stdout.strip().isdigit()
    r = ctl("follow", jd)
    assert r.returncode == 3
    assert r.stdout.splitlines() == ["hello a b", "err"]


def test_gloo_interface_derived_from_node_ip(tmp_path):
    jd = job(tmp_path, "t2.0.1.", "echo $GLOO_SOCKET_IFNAME", {"MLCLOUD_NODE_IP": "127.0.0.1"})
    ctl("start", jd)
    assert ctl("follow", jd).stdout.strip() == "lo"


def test_kill_reaches_processes_in_other_sessions(tmp_path):
    # torchrun puts workers in sessions of their own; they must still be found and killed.
    script = "setsid sleep 300 & setsid bash -c 'trap \"\" TERM; sleep 300' & wait"
    jd = job(tmp_path, "t3.0.1.", script)
    ctl("start", jd)
    deadline = time.time() + 10
    while len(tagged_pids("t3.0.1.")) < 4 and time.time() < deadline:
        time.sleep(0.1)
    assert len(tagged_pids("t3.0.1.")) >= 4
    ctl("kill", "t3.0.", "1")
    assert tagged_pids("t3.0.1.") == []
    r = ctl("follow", jd)
    assert r.returncode != 0


def test_kill_9_of_everything_reports_killed(tmp_path):
    import os
    import signal

    jd = job(tmp_path, "t4.0.1.", "sleep 300")
    ctl("start", jd)
    time.sleep(0.5)
    for pid in tagged_pids("t4.0.1."):
        os.kill(pid, signal.SIGKILL)
    r = ctl("follow", jd)
    assert r.returncode == 137 and "killed" in r.stderr


def test_kill_leaves_other_nodes_alone(tmp_path):
    a = job(tmp_path / "a", "t5.0.1.", "sleep 300")
    b = job(tmp_path / "b", "t5.1.1.", "sleep 300")
    ctl("start", a)
    ctl("start", b)
    time.sleep(0.5)
    ctl("kill", "t5.0.", "1")
    assert tagged_pids("t5.0.") == [] and tagged_pids("t5.1.")
    ctl("kill", "t5.", "1")
    assert tagged_pids("t5.") == []


def test_gpus_without_nvidia_smi():
    assert json.loads(ctl("gpus").stdout) == {"count": 0, "model": None}


def test_workers_die_with_their_node_job(tmp_path):
    # torchrun's workers live in sessions of their own: killing the job's process group (a
    # node_ctl crash) must not leave them running until `down`
    import os
    import signal

    jd = job(tmp_path, "t6.0.1.", "setsid sleep 300 & wait")
    waiter = int(ctl("start", jd).stdout)
    deadline = time.time() + 10
    while len(tagged_pids("t6.0.1.")) < 3 and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(waiter, signal.SIGKILL)
    deadline = time.time() + 15
    while tagged_pids("t6.0.1.") and time.time() < deadline:
        time.sleep(0.2)
    assert tagged_pids("t6.0.1.") == []
    probe = json.loads(ctl("probe", jd).stdout)
    assert probe["state"] == "killed" and probe["exit_code"] == 137


def test_probe_tells_running_ended_and_not_started(tmp_path):
    jd = job(tmp_path, "t7.0.1.", "sleep 1; exit 4")
    assert json.loads(ctl("probe", jd).stdout)["state"] == "not started"
    ctl("start", jd)
    assert json.loads(ctl("probe", jd).stdout)["state"] == "running"
    assert ctl("follow", jd).returncode == 4
    p = json.loads(ctl("probe", jd).stdout)
    assert (p["state"], p["exit_code"], p["cancelled"]) == ("ended", 4, False)


def test_cancel_marks_the_job_and_a_late_start_refuses(tmp_path):
    jd = job(tmp_path, "t8.0.1.", "sleep 300")
    ctl("cancel", jd, "t8.0.1.", "1")
    r = ctl("start", jd)
    assert r.returncode != 0 and "cancelled" in r.stderr
    assert tagged_pids("t8.0.1.") == []
    assert json.loads(ctl("probe", jd).stdout)["cancelled"] is True


def test_exec_returns_when_the_shell_exits(tmp_path):
    # a background child keeps the output pipe open; the command is over when the shell is
    import os
    import signal

    start = time.time()
    line = "echo hi; echo oops >&2; sleep 300 & echo $! > bg.pid; exit 3"
    r = ctl("exec", str(tmp_path), line, timeout=20)
    os.kill(int((tmp_path / "bg.pid").read_text()), signal.SIGKILL)
    assert time.time() - start < 10
    assert (r.returncode, r.stdout, r.stderr) == (3, "hi\n", "oops\n")


def test_exec_of_a_shell_killed_by_a_signal_exits_128_plus_n(tmp_path):
    r = ctl("exec", str(tmp_path), "kill -9 $$", timeout=20)
    assert r.returncode == 137, r  # not 247, which is -9 wrapped
