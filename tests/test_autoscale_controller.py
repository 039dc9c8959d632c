"""The controller over the local provider, in process: it writes the heartbeat and reads the
agent's samples (the node-side contract, written here as an agent would), and applies the
budget stop and the idle teardown as the node agents do (machines mlcloud does not own stop
their processes and keep their directories; machines it owns are terminated); each decision
is an event."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import tagged_pids
from mlcloud.providers.base import Capabilities
from mlcloud.providers.local import LocalProvider

from mlcloud import state
from mlcloud.control import nodeevents
from mlcloud.control import policy as pol
from mlcloud.control.controller import Controller
from mlcloud.provision import handle, lifecycle
from mlcloud.report import PlainReporter
from mlcloud.spec.task import AutoscaleSpec, TaskSpec


def _up(name: str, price: float, **auto) -> tuple[state.Store, handle.Handle]:
    spec = TaskSpec(provider="local", nodes=2, autoscale=AutoscaleSpec(**auto))
    store = state.open_store()
    lifecycle.up(store, name, spec, PlainReporter(quiet=True), price=price)
    return store, handle.open_cluster(store, name)


def _samples(root: str, verdicts: list[tuple[float, str]]) -> None:
    agent = Path(root) / "agent"
    agent.mkdir(parents=True, exist_ok=True)
    with open(agent / "samples.jsonl", "w") as f:
        for t, verdict in verdicts:
            f.write(json.dumps({"time": t, "gpus": [], "job": None, "verdict": verdict}) + "\n")
        f.write('{"time": 1, "verd')  # a line the agent is still writing


def test_a_pass_writes_heartbeats_and_holds_back_when_healthy():
    store, h = _up("ok", price=1.0)
    ctl = Controller(store, h, PlainReporter(quiet=True))
    now = time.time()
    plan = ctl.step(now)
    assert plan.actions == ()
    for n in h.nodes:
        assert abs(float((Path(n.root) / "agent" / "heartbeat").read_text()) - now) < 1
    ctl.detach()  # a controller that leaves takes its heartbeat away
    assert not any((Path(n.root) / "agent" / "heartbeat").exists() for n in h.nodes)
    lifecycle.down(store, "ok", PlainReporter(quiet=True))


def _stopped_as_the_agents_stop(store: state.Store, name: str, kind: str) -> None:
    """Local nodes: processes ended, nodes marked terminated with the agent's stop record and
    event, billing closed, directories kept (checkpoints, events) until `down`."""
    rec = store.get_cluster(name)
    assert rec is not None and rec.status == state.UP
    assert all(n.status == "terminated" for n in rec.nodes)
    for n in rec.nodes:
        assert json.loads((Path(n.root) / "agent" / "stopped").read_text())["kind"] == kind
    assert tagged_pids(f"{rec.uid}.") == []
    assert not any(
        _alive(int((Path(n.root) / "agent" / "agent.pid").read_text())) for n in rec.nodes
    )
    per_node = [e for e in nodeevents.log(store, rec) if e.kind == kind and e.node is not None]
    assert sorted(e.node for e in per_node) == [0, 1]
    assert "stopping the cluster's processes" in per_node[0].message
    assert nodeevents.stop_reasons(nodeevents.log(store, rec))  # what `status NAME` shows
    assert all(i.end is not None for i in store.billing(name))
    again = Controller(store, handle.open_cluster(store, name), PlainReporter(quiet=True))
    assert again.step().actions == () and again.gone  # a later pass (cron) leaves it be
    lifecycle.down(store, name, PlainReporter(quiet=True))
    assert not any(Path(n.root).exists() for n in rec.nodes)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_budget_stop_stops_the_cluster_with_its_reason():
    # 2 nodes x $3600/h: $1 a second each; max_cost $5 is spent within a few seconds
    store, h = _up("money", price=3600.0, max_cost=5.0)
    ctl = Controller(store, h, PlainReporter(quiet=True))
    assert ctl.policy.max_cost == 5.0
    assert ctl.step(time.time()).kinds() in ([], [pol.BUDGET_STOP])
    deadline = time.time() + 10
    while not ctl.gone and time.time() < deadline:
        ctl.step(time.time())
        time.sleep(0.2)
    assert ctl.gone
    (msg,) = [m for _, k, m in store.events("money") if k == pol.BUDGET_STOP][:1]
    assert "of max_cost $5.00" in msg
    spent = sum(i.price * ((i.end or 0) - i.start) / 3600 for i in store.billing("money"))
    assert spent <= 5.0 + 2 * 2  # stopped one poll early, give or take a slow pass here
    _stopped_as_the_agents_stop(store, "money", pol.BUDGET_STOP)


def test_idle_teardown_from_the_agents_samples():
    store, h = _up("idle", price=0.0, idle_minutes=0.05)  # 3 s
    now = time.time()
    for n in h.nodes:
        _samples(n.root, [(now - 10, "busy"), (now - 4, "idle"), (now - 2, "idle")])
    ctl = Controller(store, h, PlainReporter(quiet=True))
    assert ctl.step(now).kinds() == [pol.IDLE_DOWN]
    (msg,) = [m for _, k, m in store.events("idle") if k == pol.IDLE_DOWN][:1]  # the controller's
    assert "idle for 0.05 min" in msg
    _stopped_as_the_agents_stop(store, "idle", pol.IDLE_DOWN)


class _Owned(LocalProvider):
    """The local provider as if its nodes were machines mlcloud made (a cloud's)."""

    capabilities = Capabilities(owns_machines=True)


def test_idle_teardown_terminates_machines_mlcloud_owns(monkeypatch):
    owned = _Owned()
    monkeypatch.setattr("mlcloud.providers.get", lambda name: owned)
    # the agents' own idle stop (30 s) must not race the controller's `down` here
    store, h = _up("owned", price=0.0, idle_minutes=0.5)
    # `down` leaves the processes of a machine it owns to the cloud's termination, which the
    # local provider does not do: a live agent's first write raced the directory's removal
    from mlcloud.templates import node_ctl

    for n in h.nodes:
        pid = int((Path(n.root) / "agent" / "agent.pid").read_text())
        node_ctl.stop_agent(n.root)
        while node_ctl._alive(pid):
            time.sleep(0.05)
    now = time.time()
    for n in h.nodes:
        _samples(n.root, [(now - 40, "idle"), (now - 2, "idle")])
    assert Controller(store, h, PlainReporter(quiet=True)).step(now).kinds() == [pol.IDLE_DOWN]
    assert store.get_cluster("owned") is None  # terminated, as `down` does
    assert not any(Path(n.root).exists() for n in h.nodes)


def test_idle_holds_back_while_a_node_is_busy():
    store, h = _up("busy", price=0.0, idle_minutes=0.05)
    now = time.time()
    _samples(h.nodes[0].root, [(now - 10, "idle"), (now - 1, "idle")])
    _samples(h.nodes[1].root, [(now - 10, "idle"), (now - 1, "busy")])
    assert Controller(store, h, PlainReporter(quiet=True)).step(now).actions == ()
    lifecycle.down(store, "busy", PlainReporter(quiet=True))


def test_a_node_that_stopped_itself_keeps_its_own_stop_record():
    store, h = _up("self", price=0.0, idle_minutes=0.5)  # the real agents stay out of it
    now = time.time()
    for n in h.nodes:
        _samples(n.root, [(now - 40, "idle"), (now - 2, "idle")])
    own = {"time": now - 1, "kind": "budget_stop", "reason": "the node's own"}
    (Path(h.nodes[0].root) / "agent" / "stopped").write_text(json.dumps(own))
    assert Controller(store, h, PlainReporter(quiet=True)).step(now).kinds() == [pol.IDLE_DOWN]
    assert json.loads((Path(h.nodes[0].root) / "agent" / "stopped").read_text()) == own
    kinds = json.loads((Path(h.nodes[1].root) / "agent" / "stopped").read_text())["kind"]
    assert kinds == pol.IDLE_DOWN
    lifecycle.down(store, "self", PlainReporter(quiet=True))


def test_a_joining_node_gets_the_job_environment_from_a_node_not_from_a_file(monkeypatch):
    """The saved request keeps the environment's names only; the values a replacement needs
    come back from a node that runs the job (its job.json), else from the controller's own
    environment, else one line naming what is missing."""
    from mlcloud.errors import MlcloudError
    from mlcloud.jobs import launch

    store, h = _up("envs", 0.0)
    try:
        jd = Path(launch.job_dir(h.nodes[1].root, 1))
        jd.mkdir(parents=True)
        (jd / "job.json").write_text(json.dumps({"env": {"TOKEN": "s3cr3t", "OMP": "1"}}))
        assert launch.job_env(h, 1, ["TOKEN"], [0, 1]) == {"TOKEN": "s3cr3t"}  # node0 has none
        monkeypatch.setenv("TOKEN", "from-here")
        assert launch.job_env(h, 1, ["TOKEN"], [0]) == {"TOKEN": "from-here"}
        monkeypatch.delenv("TOKEN")
        with pytest.raises(MlcloudError, match=r"no node left holds its environment \(TOKEN\)"):
            launch.job_env(h, 1, ["TOKEN"], [0])
    finally:
        h.close()
        lifecycle.down(store, "envs", PlainReporter(quiet=True))


def test_a_projected_overrun_shrinks_an_elastic_job_by_its_progress():
    """The job's progress, as the agents sample it, gives its remaining time: 10% in the last
    10 min, 80% left: 80 min more on 2 nodes at $3.60/h each is ~$9.60, over max_cost $1
    (nothing near spent yet): the controller takes one node away (checkpoint, then drop)."""
    from mlcloud.state import paths

    spec = TaskSpec(provider="local", nodes=2, min_nodes=1, autoscale=AutoscaleSpec(max_cost=1.0))
    store = state.open_store()
    lifecycle.up(store, "shrink", spec, PlainReporter(quiet=True), price=3.6)
    h = handle.open_cluster(store, "shrink")
    try:
        job = store.new_job("shrink", h.record.uid, "train.py", 2, 1, paths.logs_dir("shrink"))
        store.update_job("shrink", h.record.uid, job.job_id, status=state.JOB_RUNNING)
        now = time.time()
        for n in h.nodes:
            agent = Path(n.root) / "agent"
            with open(agent / "samples.jsonl", "w") as f:
                for k in range(121):  # every 5 s, 0.10 -> 0.20 done
                    sample = {
                        "time": now - 600 + 5 * k,
                        "gpus": [],
                        "job": {"id": job.job_id, "state": "running", "progress": 0.1 + k / 1200},
                        "verdict": "busy",
                    }
                    f.write(json.dumps(sample) + "\n")
        ctl = Controller(store, h, PlainReporter(quiet=True))
        snap = ctl.snapshot(now)
        assert snap.job is not None and snap.job.remaining_s == pytest.approx(4800.0)
        plan = ctl.step(now)
        assert plan.kinds() == [pol.SHRINK]
        (msg,) = [m for _, k, m in store.events("shrink") if k == "scale_down"]
        assert "on 2 nodes is over max_cost $1.00" in msg
        assert len(h.nodes) == 1  # one node fewer, in state and in the handle
        assert len(store.get_cluster("shrink").nodes) == 1
    finally:
        h.close()
        lifecycle.down(store, "shrink", PlainReporter(quiet=True))


def test_a_pass_lock_removed_by_its_holder_still_lets_one_pass_at_a_time():
    """A pass that finds the cluster gone removes the lock file it holds; a pass waiting on
    that file must not then run beside a third that made the file anew."""
    import threading

    store, h = _up("locks", price=0.0)
    first, second, third = (Controller(store, h, PlainReporter(quiet=True)) for _ in range(3))
    inside: list[str] = []
    second_in, let_second_go = threading.Event(), threading.Event()

    def run_second() -> None:
        with second._pass_lock():
            inside.append("second")
            second_in.set()
            let_second_go.wait(10)
            inside.remove("second")

    def run_third() -> None:
        with third._pass_lock():
            inside.append("third")
            assert "second" not in inside, inside
            inside.remove("third")

    try:
        with first._pass_lock():
            waiter = threading.Thread(target=run_second)
            waiter.start()
            time.sleep(0.5)  # the second pass waits on the lock file
            first.gone = True  # what the first found: it removes its files, the lock's too
            first._save_misses()
        assert second_in.wait(10)
        late = threading.Thread(target=run_third)
        late.start()
        time.sleep(0.5)
        assert inside == ["second"], inside  # the third waits for the second
        let_second_go.set()
        waiter.join(10)
        late.join(10)
        assert inside == [] and not late.is_alive()
    finally:
        let_second_go.set()
        h.close()
        lifecycle.down(store, "locks", PlainReporter(quiet=True))


def test_a_retired_node_bills_until_its_end_is_confirmed(monkeypatch):
    """The pass goes on after RETIRE_WAIT; the node's billing closes when the provider
    confirms it gone (later), and never on a teardown that failed."""
    import threading

    from mlcloud.control import controller
    from mlcloud.errors import MlcloudError
    from mlcloud.spec.cost import Interval

    store, h = _up("bill", price=1.0)
    slow, failed = h.nodes[1], h.nodes[0]

    def billing(node: state.NodeRecord) -> Interval:
        (i,) = [i for i in store.billing("bill") if i.node_id == node.node_id]
        return i

    real = lifecycle.terminate
    gate = threading.Event()

    def slow_terminate(*args) -> None:
        gate.wait(20)
        real(*args)

    def failing_terminate(*args) -> None:
        raise MlcloudError("node0: unreachable")

    try:
        monkeypatch.setattr(controller, "RETIRE_WAIT", 0.2)
        monkeypatch.setattr(lifecycle, "terminate", slow_terminate)
        ctl = Controller(store, h, PlainReporter(quiet=True))
        ctl._retire(slow)
        assert billing(slow).end is None  # not confirmed yet: still billing
        confirmed = time.time()
        gate.set()
        deadline = time.monotonic() + 20
        while billing(slow).end is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (billing(slow).end or 0) >= confirmed
        monkeypatch.setattr(lifecycle, "terminate", failing_terminate)
        ctl._retire(failed)
        time.sleep(0.5)
        assert billing(failed).end is None
    finally:
        gate.set()
        monkeypatch.setattr(lifecycle, "terminate", real)
        h.close()
        lifecycle.down(store, "bill", PlainReporter(quiet=True))
    assert billing(failed).end is not None  # `down` confirmed it


def test_a_fixed_size_cluster_short_of_a_node_grows_back():
    """A node lost when no place could replace it was dropped: the cluster reads the size it
    was made with, not what is left, and a later pass makes a node more (a new number)."""
    store, h = _up("short", price=1.0)
    first, dropped = h.nodes
    lifecycle.terminate(h.provider, h.ref, [handle.provider_node(dropped)], h.record)
    store.set_nodes("short", [first])  # as the controller records a drop
    ctl = Controller(store, handle.open_cluster(store, "short"), PlainReporter(quiet=True))
    now = time.time()
    assert ctl.snapshot(now).min_nodes == 2
    plan = ctl.step(now)
    assert plan.kinds() == [pol.GROW] and "in place of one lost" in plan.actions[0].reason
    rec = store.get_cluster("short")
    assert [n.node_id for n in rec.nodes][0] == first.node_id and len(rec.nodes) == 2
    assert rec.nodes[1].root.endswith("node-2")  # never a number given before
    assert ctl.step(time.time()).actions == ()
    lifecycle.down(store, "short", PlainReporter(quiet=True))
