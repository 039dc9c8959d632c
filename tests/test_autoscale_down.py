"""`down` while the controller replaces a node (local provider, in process, the replacement
held at one step): `down` never waits on the replacement (the cluster lock is held only
around state changes, not through making and bootstrapping a node), and the replacement,
finding the cluster going down, terminates what it made: nothing is left, wherever `down`
came."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import tagged_pids
from mlcloud.providers.local import LocalProvider

from mlcloud import state
from mlcloud.control import policy as pol
from mlcloud.control.controller import Controller
from mlcloud.provision import bootstrap, handle, lifecycle
from mlcloud.report import PlainReporter
from mlcloud.spec.task import TaskSpec
from mlcloud.state import paths

QUIET = PlainReporter(quiet=True)


def _agents(uid: str) -> list[int]:
    """Live node agents of the cluster (untagged: found by their command line)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        if b"agent.py" in cmd and f"/{uid}/".encode() in cmd:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("held", ["create", "bootstrap", "record"])
def test_down_during_a_replacement_goes_on_and_leaves_nothing(monkeypatch, held):
    """held: where the replacement is when `down` comes: asking the provider (the node is
    made after `down` looked), bootstrapped (its agent runs), or about to record it (past the
    last check of the cluster before the lock)."""
    store = state.open_store()
    lifecycle.up(store, "dn", TaskSpec(provider="local", nodes=2), QUIET, price=1.0)
    h = handle.open_cluster(store, "dn")
    uid = h.record.uid
    lifecycle.terminate(h.provider, h.ref, [handle.provider_node(h.nodes[1])], h.record)

    started, proceed = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        assert proceed.wait(60)

    if held == "create":
        real_create = LocalProvider.create

        def create(self, *args):
            hold()
            return real_create(self, *args)

        monkeypatch.setattr(LocalProvider, "create", create)
    elif held == "bootstrap":
        real_bootstrap = bootstrap.bootstrap

        def slow_bootstrap(*args, **kwargs):
            records = real_bootstrap(*args, **kwargs)
            hold()
            return records

        monkeypatch.setattr(bootstrap, "bootstrap", slow_bootstrap)
    else:
        real_add = lifecycle.add_nodes

        def add_nodes(store, h, count, report, cancelled=None):
            made = real_add(store, h, count, report)  # past every check of its own
            hold()
            return made

        monkeypatch.setattr(lifecycle, "add_nodes", add_nodes)

    outcome: dict[str, object] = {}

    def controller_pass() -> None:
        try:
            ctl = Controller(state.open_store(), h, QUIET)  # this thread's own connection
            outcome["plan"] = ctl.step(time.time())
            outcome["gone"] = ctl.gone
        except BaseException as e:  # noqa: BLE001 (reported below)
            outcome["error"] = e

    th = threading.Thread(target=controller_pass)
    th.start()
    try:
        assert started.wait(60), outcome
        began = time.monotonic()
        torn = lifecycle.down(store, "dn", QUIET)  # never "busy"
        assert torn is not None and time.monotonic() - began < 20
    finally:
        proceed.set()
        th.join(60)
        h.close()
    assert "error" not in outcome, outcome
    assert outcome["plan"].kinds() == [pol.REPLACE] and outcome["gone"], outcome
    assert store.get_cluster("dn") is None
    assert not (paths.home() / "local" / uid).exists(), list((paths.home() / "local").rglob("*"))
    assert tagged_pids(f"{uid}.") == [] and _agents(uid) == []
    assert not [i for i in store.billing("dn") if i.uid == uid and i.end is None]
    assert lifecycle.down(store, "dn", QUIET) is None  # nothing for a second `down`


def test_a_node_whose_bootstrap_failed_is_terminated_not_left(monkeypatch):
    """add_nodes made a node and its bootstrap failed: the node is terminated (it was left
    running, known to no state), and it gets no billing row."""
    from mlcloud.remote.transport import RemoteError

    store = state.open_store()
    lifecycle.up(store, "bad", TaskSpec(provider="local", nodes=1), QUIET, price=1.0)
    h = handle.open_cluster(store, "bad")
    real_bootstrap = bootstrap.bootstrap

    def failing(*args, **kwargs):
        real_bootstrap(*args, **kwargs)  # the agent runs there now
        raise RemoteError("node1: bootstrap output not understood")

    monkeypatch.setattr(bootstrap, "bootstrap", failing)
    try:
        with pytest.raises(RemoteError):
            lifecycle.add_nodes(store, h, 1, QUIET)
        assert [Path(n.root).name for n in h.provider.list(h.ref)] == ["node-0"]
        assert tagged_pids(f"{h.record.uid}.1.") == []
        assert [p for p in _agents(h.record.uid) if b"node-1" in _cmdline(p)] == []
        assert [i.node_id for i in store.billing("bad")] == ["local-0"]  # no row for it
    finally:
        h.close()
        lifecycle.down(store, "bad", QUIET)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_node_made_but_never_recorded_is_terminated(monkeypatch):
    """The cluster lock stays held past the wait (a `down` through a long teardown): the node
    the replacement made is terminated, not left running unknown to state."""
    from mlcloud.control import controller
    from mlcloud.errors import BusyError
    from mlcloud.state import cluster_lock

    store = state.open_store()
    lifecycle.up(store, "busy", TaskSpec(provider="local", nodes=2), QUIET)
    h = handle.open_cluster(store, "busy")
    lifecycle.terminate(h.provider, h.ref, [handle.provider_node(h.nodes[1])], h.record)
    real_add, holder = lifecycle.add_nodes, cluster_lock("busy")

    def add_nodes(store, h, count, report, cancelled=None):
        made = real_add(store, h, count, report, cancelled)
        holder.__enter__()  # someone else takes the lock now, and keeps it
        return made

    monkeypatch.setattr(lifecycle, "add_nodes", add_nodes)
    monkeypatch.setattr(controller, "RECORD_WAIT", 0.5)
    try:
        with pytest.raises(BusyError):
            Controller(store, h, QUIET).step(time.time())
        holder.__exit__(None, None, None)
        assert [Path(n.root).name for n in h.provider.list(h.ref)] == ["node-0"]
        assert tagged_pids(f"{h.record.uid}.2.") == []
        assert [p for p in _agents(h.record.uid) if b"node-2" in _cmdline(p)] == []
    finally:
        h.close()
        lifecycle.down(store, "busy", QUIET)
