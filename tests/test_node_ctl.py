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
