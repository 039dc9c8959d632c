"""An ended job's record is the truth, and every stop says why where the user looks, through
the real `mlcloud` process on the local provider (the torchrun stand-in): a cancel that comes
after the ranks ended keeps their end; a second Ctrl-C still records CANCELLED; `down` during
`train` and a rule's stop (stall, budget) are named on train's last line and in its --json;
`logs` of a job whose log is gone is an error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import MLCLOUD, run_cli, tagged_pids, wait_for

pytestmark = pytest.mark.e2e

# every rank prints, then waits for $GATE (if set) and exits 0; on SIGTERM it says so and
# takes $TERM_PAUSE seconds to end (a checkpoint being written)
JOB = """\
import os, signal, sys, time
def term(*_):
    print("got SIGTERM", flush=True)
    time.sleep(float(os.environ.get("TERM_PAUSE", "0")))
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
for i in range(int(os.environ.get("LINES", "3"))):
    print(f"line {i}", flush=True)
    time.sleep(0.2)
while os.environ.get("GATE") and not os.path.exists(os.environ["GATE"]):
    time.sleep(0.05)
print("done", flush=True)
"""


@pytest.fixture
def project(tmp_path) -> Path:
    p = tmp_path / "proj"
    p.mkdir()
    (p / "job.py").write_text(JOB)
    return p


def up(name: str, *args: str) -> str:
    r = run_cli("up", name, "--nodes", "1", "--yes", *args)
    assert r.returncode == 0, r.stderr
    (c,) = [c for c in json.loads(run_cli("status", "--json").stdout)["clusters"]]
    return c["uid"]


def train(project: Path, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [MLCLOUD, "train", name, "-w", str(project), "--nproc-per-node", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ),
    )


def the_job(name: str) -> dict:
    (c,) = [c for c in json.loads(run_cli("status", "--json").stdout)["clusters"]]
    return c["jobs"][0]


def log_has(name: str, text: str) -> bool:
    found = [c for c in json.loads(run_cli("status", "--json").stdout)["clusters"]]
    jobs = found[0]["jobs"] if found else []
    log = Path(jobs[0]["log"]) if jobs else None
    return bool(log and log.exists() and text in log.read_text())


def test_cancel_after_the_ranks_ended_keeps_their_end(project, mlcloud_home, tmp_path):
    """`train` suspended (its end unrecorded), every rank exited 0: `cancel` reads the
    nodes' exit codes first; the job SUCCEEDED, `logs --follow` exits 0, and `train`,
    resumed, agrees."""
    uid = up("sus")
    gate = tmp_path / "gate"
    proc = train(project, "sus", "-e", f"GATE={gate}", "job.py")
    try:
        wait_for(lambda: log_has("sus", "line 0"), what="the job's output")
        proc.send_signal(signal.SIGSTOP)
        gate.touch()
        ended = mlcloud_home / "local" / uid / "node-0" / "jobs" / "1" / "exit_code"
        wait_for(ended.exists, what="the rank's end on the node")
        r = run_cli("cancel", "sus", "--grace", "1", "--json", timeout=90)
        assert r.returncode == 0, r.stderr
        done = json.loads(r.stdout)
        assert (done["status"], done["exit_code"], done["stopped_by"]) == ("SUCCEEDED", 0, None)
        r = run_cli("logs", "sus", "--follow", timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert the_job("sus")["status"] == "SUCCEEDED"
    assert run_cli("down", "sus", "--yes").returncode == 0


def test_a_second_ctrl_c_still_records_cancelled(project, mlcloud_home):
    """The first Ctrl-C stops the job (SIGTERM: it checkpoints for a while); a second one
    cuts the wait short: CANCELLED 130 is recorded, never FAILED 143, and `logs --follow`
    says the same; the job still ends on the node."""
    uid = up("cc")
    proc = train(project, "cc", "-e", "LINES=100000", "-e", "TERM_PAUSE=3", "job.py")
    wait_for(lambda: log_has("cc", "line 1"), what="the job's output")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: log_has("cc", "got SIGTERM"), what="the job's SIGTERM")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    job = the_job("cc")
    assert (job["status"], job["exit_code"]) == ("CANCELLED", 130), job
    r = run_cli("logs", "cc", "--follow", timeout=30)
    assert r.returncode == 130, r.stdout + r.stderr
    wait_for(lambda: tagged_pids(f"{uid}.") == [], timeout=30, what="the job's end")
    assert the_job("cc")["status"] == "CANCELLED"
    assert run_cli("down", "cc", "--yes").returncode == 0


def test_down_during_train_is_named_on_trains_last_line(project, mlcloud_home):
    up("dd")
    proc = train(project, "dd", "--json", "-e", "LINES=100000", "job.py")
    wait_for(lambda: log_has("dd", "line 1"), what="the job's output")
    r = run_cli("down", "dd", "--yes")
    assert r.returncode == 0, r.stderr
    out, err = proc.communicate(timeout=60)
    result = json.loads(out)
    assert result["status"] == "CANCELLED" and result["stopped_by"] == "down", result
    last = err.strip().splitlines()[-1]
    assert "stopped by `mlcloud down`: cluster dd was torn down" in last, err[-2000:]
    assert proc.returncode == result["exit_code"] != 0


def test_a_budget_stop_is_named_on_trains_last_line(project, mlcloud_home, tmp_path):
    """max_cost spent (a fake price makes the deadline a few seconds out): the job ends, and
    train's last line and --json name the budget rule, not only a signal."""
    from mlcloud import state
    from mlcloud.provision import lifecycle
    from mlcloud.report import PlainReporter
    from mlcloud.spec.task import AutoscaleSpec, TaskSpec

    price, budget_s = 36.0, 6.0
    spec = TaskSpec(
        provider="local",
        autoscale=AutoscaleSpec(max_cost=price * budget_s / 3600, poll_seconds=0.5),
    )
    store = state.open_store()
    rec = lifecycle.up(store, "bud", spec, PlainReporter(quiet=True), price=price)
    store.close()
    proc = train(project, "bud", "-e", "LINES=100000", "job.py")
    out, err = proc.communicate(timeout=120)
    last = out.strip().splitlines()[-1]
    assert "job 1 stopped by the budget rule" in last, out[-2000:] + err[-2000:]
    assert proc.returncode != 0
    assert tagged_pids(f"{rec.uid}.") == []
    assert run_cli("down", "bud", "--yes").returncode == 0


def test_logs_with_its_log_directory_gone_is_an_error(project, mlcloud_home):
    up("lg")
    r = run_cli("train", "lg", "-w", str(project), "job.py")
    assert r.returncode == 0, r.stderr
    shutil.rmtree(mlcloud_home / "logs" / "lg")
    for args in (["logs", "lg"], ["logs", "lg", "--follow"]):
        r = run_cli(*args)
        assert r.returncode == 1 and r.stdout == "", (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: job 1's log is gone") and r.stderr.count("\n") == 1
    assert run_cli("down", "lg", "--yes").returncode == 0


NOISY = """\
import sys
print("step 1", flush=True)
sys.stderr.write(
    "[W1207 18:15:10.175646965 TCPStore.cpp:115] [c10d] recvVector failed on SocketImpl(fd=3, "
    "addr=[::ffff:127.0.0.1]:46450, remote=[::ffff:127.0.0.1]:24557): Failed to recv, got 0 "
    "bytes. Connection was likely closed. Did the remote server shutdown or crash?\\n"
    "Exception raised from recvBytes at /pytorch/torch/csrc/distributed/c10d/Utils.hpp:787\\n"
    "frame #0: c10::Error::Error(c10::SourceLocation) + 0x9d (0x7fd0 in libc10.so)\\n"
    "frame #1: <unknown function> + 0x674777d (0x7fd0 in libtorch_cpu.so)\\n"
    "<omitting python frames>\\n"
    "frame #27: _start + 0x21 (0x5612 in python)\\n"
    "\\n"
    "W1207 18:15:10.216000 5777 torch/distributed/elastic/rendezvous/dynamic_rendezvous.py:1298]"
    " The node '127.0.0.1_5777_0' has failed to shutdown the rendezvous 'x-1' due to an error of"
    " type RendezvousConnectionError.\\n"
)
sys.stderr.flush()
print("done", flush=True)
"""


def test_torchs_teardown_noise_is_kept_from_the_terminal_not_the_log(tmp_path, mlcloud_home):
    project = tmp_path / "noisy"
    project.mkdir()
    (project / "noisy.py").write_text(NOISY)
    up("nz")
    r = run_cli("train", "nz", "-w", str(project), "--nproc-per-node", "1", "noisy.py")
    assert r.returncode == 0, r.stderr
    shown = r.stdout + r.stderr
    assert "[node0] step 1" in shown and "[node0] done" in shown, shown
    for noise in ("Failed to recv", "frame #", "Exception raised from", "omitting python"):
        assert noise not in shown, shown
    assert "failed to shutdown the rendezvous" not in shown, shown
    assert r.stdout.strip().splitlines()[-1] == "[mlcloud] job 1 succeeded on 1 node(s)", shown
    log = Path(the_job("nz")["log"]).read_text()
    assert "frame #27" in log and "Failed to recv" in log and "failed to shutdown" in log
    assert run_cli("down", "nz", "--yes").returncode == 0
