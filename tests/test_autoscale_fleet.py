"""`autoscale --all`: a controller service for every cluster in the store, each cluster led by
one of however many run; a killed leader's clusters are taken over."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from conftest import MLCLOUD, run_cli

from mlcloud import state

pytestmark = pytest.mark.e2e


def _leaders(store) -> list[int]:
    """The pids that took the lead of cluster `fl`, in order, from its events."""
    return [
        int(m.group(1))
        for _, kind, message in store.events("fl")
        if kind == "leader" and (m := re.search(r"pid (\d+)\]", message))
    ]


def _wait(what, deadline: float):
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.1)
    return what()


def test_a_killed_leader_is_replaced_by_another_controller(pg_url):
    assert run_cli("up", "fl", "--nodes", "1", "--yes").returncode == 0
    store = state.open_store()
    services = [
        subprocess.Popen(
            [MLCLOUD, "autoscale", "--all", "--interval", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        first = _wait(lambda: _leaders(store), time.monotonic() + 30)
        assert len(first) == 1 and first[0] in {p.pid for p in services}, first
        time.sleep(2)  # a few sweeps of both: still one leader
        assert _leaders(store) == first
        leader = next(p for p in services if p.pid == first[0])
        killed_at = time.monotonic()
        leader.kill()  # kill -9 mid-pass: its lease goes with its connection
        leader.wait(10)
        both = _wait(lambda: _leaders(store)[1:] and _leaders(store), time.monotonic() + 30)
        other = next(p for p in services if p is not leader)
        assert both == [leader.pid, other.pid], both
        assert time.monotonic() - killed_at < 15  # one sweep plus the server seeing it gone
        other.send_signal(signal.SIGINT)
        assert other.wait(30) == 130
        assert "Traceback" not in other.stderr.read()
    finally:
        for p in services:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert run_cli("down", "fl", "--yes").returncode == 0


def test_all_once_and_its_refusals(mlcloud_home):
    assert run_cli("up", "fl", "--nodes", "1", "--yes").returncode == 0
    r = run_cli("autoscale", "--all", "--once", "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["clusters"] == ["fl"] and f"pid {os.getpid()}" not in done["controller"]
    for args in (["autoscale"], ["autoscale", "fl", "--all"]):
        r = run_cli(*args)
        assert r.returncode == 2 and "--all" in r.stderr.strip().splitlines()[-1]
    assert run_cli("down", "fl", "--yes").returncode == 0


def test_the_service_examples_run_autoscale_all():
    from pathlib import Path

    import yaml

    examples = Path(__file__).resolve().parents[1] / "examples"
    unit = (examples / "systemd" / "mlcloud-autoscale.service").read_text()
    (start,) = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
    assert start.split()[1:4] == ["autoscale", "--all", "--interval"]
    docs = list(
        yaml.safe_load_all((examples / "kubernetes" / "mlcloud-autoscale.yaml").read_text())
    )
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "mlcloud autoscale --all" in container["args"][0]
    assert deploy["spec"]["replicas"] >= 2  # one leads each cluster, the other takes over


def test_a_lost_node_is_replaced_once_when_its_leader_dies_mid_pass(pg_url, mlcloud_home):
    """The leader is killed (-9) as it asks for the replacement: the controller that takes
    over replaces the node, once."""
    import shutil

    from mlcloud.remote.shell import stop_input, stop_line

    assert run_cli("up", "fl", "--nodes", "2", "--yes").returncode == 0
    store = state.open_store()
    rec = store.get_cluster("fl")
    services = [
        subprocess.Popen(
            [MLCLOUD, "autoscale", "--all", "--interval", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        (first,) = _wait(lambda: _leaders(store), time.monotonic() + 30)
        leader = next(p for p in services if p.pid == first)
        lost = rec.nodes[1]
        line = stop_line(lost.python, lost.root, rec.uid)
        subprocess.run(["sh", "-c", line], input=stop_input(), check=True)
        shutil.rmtree(lost.root)

        def asked():
            return [m for _, k, m in store.events("fl") if k == "intent" and "in place of" in m]

        assert _wait(asked, time.monotonic() + 30), store.events("fl")
        leader.kill()  # mid-pass: the replacement asked for, not yet recorded
        leader.wait(10)

        def replaced():
            return [m for _, k, m in store.events("fl") if k == "node_replaced"]

        done = _wait(replaced, time.monotonic() + 60)
        time.sleep(3)  # a few more passes: nothing replaced twice
        assert len(replaced()) == 1, store.events("fl")
        assert len(done) == 1 and f"pid {first}]" not in done[0], done
        now = store.get_cluster("fl")
        assert len(now.nodes) == 2 and lost.node_id not in [n.node_id for n in now.nodes]
    finally:
        for p in services:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(30)
    assert run_cli("down", "fl", "--yes").returncode == 0
    assert not (mlcloud_home / "local" / rec.uid).exists()


def test_passes_from_two_homes_take_turns_and_replace_a_loss_once(
    pg_url, make_ssh_nodes, tmp_path, monkeypatch
):
    """`autoscale NAME` in two homes on one shared store: a pass waits while another home
    holds the cluster's pass lock, and a lost node is replaced once, not once per home."""
    from conftest import ssh_up_args

    from mlcloud.state import pg

    monkeypatch.setenv("MLCLOUD_STATE_KEY", "team-secret-1")
    nodes = make_ssh_nodes(3)
    r = run_cli(*ssh_up_args(nodes, "tw"), "--nodes", "1:2")
    assert r.returncode == 0, r.stderr
    homes = [dict(os.environ), dict(os.environ, MLCLOUD_HOME=str(tmp_path / "b"))]
    store = state.open_store()
    rec = store.get_cluster("tw")
    watch = pg.connect(pg_url)

    def polling(pid: int) -> bool:
        """pid's controller is waiting for the pass lock (its own connection, asking)."""
        rows = watch.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"mlcloud % {pid} %",),
        ).fetchall()
        return any(q.startswith("SELECT pg_try_advisory_lock") for (q,) in rows)

    with pg.pass_lock(pg_url, rec.uid):  # a pass of the first home, under way
        once = subprocess.Popen(
            [MLCLOUD, "autoscale", "tw", "--once"], env=homes[1], stderr=subprocess.PIPE
        )
        try:
            assert _wait(lambda: polling(once.pid), time.monotonic() + 30)
            time.sleep(0.5)
            assert once.poll() is None  # still waiting: no pass beside the first home's
        except BaseException:
            once.kill()
            raise
    assert once.wait(60) == 0, once.stderr.read()
    watch.close()

    services = [
        subprocess.Popen(
            [MLCLOUD, "autoscale", "tw", "--interval", "1"],
            env=home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for home in homes
    ]
    try:
        nodes.kill(1)  # sshd and everything it started on the second host

        def replaced():
            return [m for _, k, m in store.events("tw") if k == "node_replaced"]

        assert _wait(replaced, time.monotonic() + 60), store.events("tw")
        time.sleep(3)  # a few more passes of both: nothing replaced twice
        assert len(replaced()) == 1, store.events("tw")
        asked = [m for _, k, m in store.events("tw") if k == "intent" and "in place of" in m]
        assert len(asked) == 1, asked
        now = [n.ip for n in store.get_cluster("tw").nodes]
        assert now == [nodes.hosts[0], nodes.hosts[2]], now
    finally:
        for p in services:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(30)
    nodes.restart(1)  # the lost host, back: `down` cleans it
    r = run_cli("down", "tw", "--yes")
    assert r.returncode == 0, r.stderr
