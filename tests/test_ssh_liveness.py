"""A node that vanishes without a TCP reset (its link cut in a network namespace the test
makes) is reported lost within 30 s: by a running command, by a file transfer, and by the
driver of a single-node job, which records it LOST."""

from __future__ import annotations

import ipaddress
import threading
import time

import netns
import pytest
import sitecustomize as netguard

from mlcloud.remote.ssh import SshTarget, SshTransport
from mlcloud.remote.transport import LostError

pytestmark = pytest.mark.skipif(not netns.available(), reason="needs root, iproute2 and sshd")

LOST_WITHIN = 30.0


@pytest.fixture
def ns_node(tmp_path, monkeypatch):
    """An sshd in its own namespace; this process may reach that namespace's /30 only."""
    with netns.NsNode(tmp_path / "ns") as node:
        subnet = ipaddress.ip_network(node.subnet)
        loopback = netguard._loopback

        def allowed(host) -> bool:
            try:
                return ipaddress.ip_address(str(host)) in subnet
            except ValueError:
                return loopback(host)

        monkeypatch.setattr(netguard, "_loopback", lambda h: allowed(h) or loopback(h))
        yield node
    assert not node.pids()


def transport(node) -> SshTransport:
    target = SshTarget(node.host, node.port, "root", identity_file=str(node.client_key))
    return SshTransport(target, "node0")


def test_a_silent_node_fails_a_running_command_within_30s(ns_node):
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
    ns_node.cut()
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


def test_a_silent_node_fails_a_transfer_within_30s(ns_node):
    t = transport(ns_node)
    t.put(b"x", "/tmp/mlcloud-liveness-probe")  # connected, sftp open
    ns_node.cut()
    cut_at = time.monotonic()
    with pytest.raises(LostError):
        t.put(b"y" * (64 << 20), "/tmp/mlcloud-liveness-probe")  # far beyond any TCP buffer
    assert time.monotonic() - cut_at < LOST_WITHIN
    t.close()


def test_a_busy_connection_is_not_taken_for_a_lost_one(ns_node):
    """The heartbeat must answer under load: 25 s of streaming output raise nothing."""
    t = transport(ns_node)
    count = []
    r = t.run(
        "end=$((SECONDS+25)); while [ $SECONDS -lt $end ]; do seq 1 2000; done",
        on_line=count.append,
        timeout=60,
    )
    assert r.exit_code == 0 and len(count) > 1000
    t.close()


def test_the_driver_records_a_silent_single_node_lost_within_30s(ns_node, tmp_path):
    import shutil
    from pathlib import Path

    from mlcloud import cluster, launch, state
    from mlcloud.driver import LOST, Driver
    from mlcloud.report import PlainReporter
    from mlcloud.spec import SshSpec, TaskSpec

    spec = TaskSpec(
        provider="ssh",
        hosts=(f"root@{ns_node.host}:{ns_node.port}",),
        ssh=SshSpec(identity_file=str(ns_node.client_key)),
    )
    store = state.open_store()
    rec = cluster.up(store, "solo", spec, PlainReporter(quiet=True))
    try:
        h = cluster.open_cluster(store, "solo")
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
                ns_node.cut()
                cut_at.append(time.monotonic())

        code = Driver(store, h, job, sink).run()  # in this thread: the store is this thread's
        assert cut_at and time.monotonic() - cut_at[0] < LOST_WITHIN
        assert code == LOST
        assert any("lost contact" in line and "no answer" in line for line in lines), lines
        done = store.get_job("solo", 1, rec.uid)
        assert done is not None and done.status == state.JOB_FAILED and done.exit_code == LOST
        h.close()
    finally:
        shutil.rmtree(Path.home() / ".mlcloud" / rec.uid, ignore_errors=True)
