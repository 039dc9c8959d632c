"""A node that vanishes without a TCP reset (its link cut in a network namespace the test
makes) is reported lost within 10 s: by a running command, by a file transfer, and by the
driver of a single-node job, which records it LOST.

The first test runs the heartbeat at its defaults (the 10 s the README promises); the others
at 1 s beats and a 4 s timeout (MLCLOUD_SSH_HEARTBEAT_EVERY/_TIMEOUT), the same code at a
test's pace."""

from __future__ import annotations

import threading
import time

import nsbridge
import pytest

from mlcloud.provision import handle, lifecycle
from mlcloud.remote.ssh import SshTarget, SshTransport
from mlcloud.remote.transport import LostError

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not nsbridge.available(), reason="needs root, iproute2 and sshd"),
]

LOST_WITHIN = 10.0
QUICK_EVERY, QUICK_TIMEOUT = 1, 4  # for the tests that are not about the defaults
QUICK_WITHIN = QUICK_EVERY + QUICK_TIMEOUT + 3  # and slack for a loaded machine


@pytest.fixture
def ns_node(tmp_path, monkeypatch):
    """An sshd in its own namespace; the network guard lets this test's processes reach it."""
    with nsbridge.NsBridge(1, tmp_path / "ns") as node:
        monkeypatch.setenv("MLCLOUD_NETGUARD_ALLOW", node.subnet)
        yield node
    assert not node.pids(0)


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setenv("MLCLOUD_SSH_HEARTBEAT_EVERY", str(QUICK_EVERY))
    monkeypatch.setenv("MLCLOUD_SSH_HEARTBEAT_TIMEOUT", str(QUICK_TIMEOUT))


def transport(node) -> SshTransport:
    target = SshTarget(node.hosts[0], nsbridge.PORT, "root", identity_file=str(node.client_key))
    return SshTransport(target, "node0")


def test_a_silent_node_fails_a_running_command_within_10s(ns_node, monkeypatch):
    monkeypatch.delenv("MLCLOUD_SSH_HEARTBEAT_EVERY", raising=False)  # as users run it
    monkeypatch.delenv("MLCLOUD_SSH_HEARTBEAT_TIMEOUT", raising=False)
    t = transport(ns_node)
    lines: list[str] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def follow() -> None:
        try:
            t.run(
                "echo started; sleep 600",
                on_line=lambda line: (lines.append(line), started.set()),
            )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=follow, daemon=True)
    th.start()
    assert started.wait(20) and lines == ["started"]
    ns_node.cut(0)
    cut_at = time.monotonic()
    th.join(LOST_WITHIN + 5)
    took = time.monotonic() - cut_at
    assert not th.is_alive(), "still waiting on a node that is gone"
    assert took < LOST_WITHIN
    assert len(errors) == 1 and isinstance(errors[0], LostError), errors
    assert "node0" in str(errors[0]) and "no answer" in str(errors[0])
    # later calls say so at once instead of hanging on a new connection
    quick = time.monotonic()
    with pytest.raises(LostError):
        t.run("true")
    assert time.monotonic() - quick < 2
    t.close()


def test_a_silent_node_fails_a_transfer(ns_node, quick):
    t = transport(ns_node)
    t.put(b"x", "/tmp/mlcloud-liveness-probe")  # connected, sftp open
    ns_node.cut(0)
    cut_at = time.monotonic()
    with pytest.raises(LostError, match="no answer for 4 s"):
        t.put(b"y" * (64 << 20), "/tmp/mlcloud-liveness-probe")  # far beyond any TCP buffer
    assert time.monotonic() - cut_at < QUICK_WITHIN
    t.close()


def test_a_busy_connection_is_not_taken_for_a_lost_one(ns_node, quick):
    """The heartbeat must answer under load: streaming output past several beats, and past a
    heartbeat's timeout, is fine."""
    t = transport(ns_node)
    count = []
    r = t.run(
        "end=$((SECONDS+7)); while [ $SECONDS -lt $end ]; do seq 1 2000; done",
        on_line=count.append,
        timeout=60,
    )
    assert r.exit_code == 0 and len(count) > 1000
    t.close()


def test_the_driver_records_a_silent_single_node_lost(ns_node, quick, tmp_path):
    import shutil
    from pathlib import Path

    from mlcloud import state
    from mlcloud.jobs import launch
    from mlcloud.jobs.driver import LOST, Driver
    from mlcloud.report import PlainReporter
    from mlcloud.spec.task import SshSpec, TaskSpec

    spec = TaskSpec(
        provider="ssh",
        hosts=(ns_node.targets[0],),
        ssh=SshSpec(identity_file=str(ns_node.client_key)),
    )
    store = state.open_store()
    rec = lifecycle.up(store, "solo", spec, PlainReporter(quiet=True))
    try:
        h = handle.open_cluster(store, "solo")
        jd = launch.job_dir(h.nodes[0].root, 1)
        # a job as node_ctl leaves it: a live waiter and an output log
        h.transports[0].run(
            f"mkdir -p {jd} && echo hello > {jd}/output.log && "
            f"(nohup sleep 600 >/dev/null 2>&1 </dev/null & echo $! > {jd}/waiter.pid)"
        )
        job = store.new_job("solo", rec.uid, "train.py", 1, 1, tmp_path)
        lines: list[str] = []
        cut_at: list[float] = []

        def sink(line: str) -> None:
            lines.append(line)
            if line == "[node0] hello":  # following: now the node goes silent
                ns_node.cut(0)
                cut_at.append(time.monotonic())

        code = Driver(store, h, job, sink).run()  # in this thread: the store is this thread's
        assert cut_at and time.monotonic() - cut_at[0] < QUICK_WITHIN
        assert code == LOST
        assert any("lost contact" in line and "no answer" in line for line in lines), lines
        done = store.get_job("solo", 1, rec.uid)
        assert done is not None and done.status == state.JOB_FAILED and done.exit_code == LOST
        h.close()
    finally:
        shutil.rmtree(Path.home() / ".mlcloud" / rec.uid, ignore_errors=True)


def test_train_reports_a_node_cut_off_mid_job_lost(ns_node, quick, tmp_path):
    """The whole CLI: `up` on the namespaced host, `train` there, then its link goes down."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    from conftest import MLCLOUD, SLOW_TRAIN, run_cli

    assert run_cli("init", str(tmp_path / "proj")).returncode == 0
    (tmp_path / "proj" / "slow.py").write_text(SLOW_TRAIN)  # paced: it runs until cut off
    spec = tmp_path / "proj" / "mlcloud.yaml"
    host = ns_node.targets[0]
    r = run_cli("up", "solo", "--hosts", host, "--identity", str(ns_node.client_key))
    assert r.returncode == 0, r.stderr
    uid = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["uid"]
    try:
        proc = subprocess.Popen(
            [MLCLOUD, "train", "solo", "-f", str(spec), "slow.py", "--", "--steps", "1000000"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if " step 20 " in line or len(seen) > 500:
                break
        assert any(" step 20 " in line for line in seen), "".join(seen)
        ns_node.cut(0)
        cut_at = time.monotonic()
        try:
            out, err = proc.communicate(timeout=LOST_WITHIN + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        took = time.monotonic() - cut_at
        assert proc.returncode == 255, err[-2000:]
        assert "job 1 failed: node0: lost contact" in out, out[-2000:]
        assert took < QUICK_WITHIN + 5  # the node is found lost, then state is written
        job = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["jobs"][0]
        assert job["status"] == "FAILED" and job["exit_code"] == 255
    finally:
        run_cli("down", "solo", "--yes", "--purge")
        shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)
