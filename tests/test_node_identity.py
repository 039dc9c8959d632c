"""A node's number is fixed when it is made and travels with it (local provider, in process):
a replacement gets a number the cluster never used, its agent is configured with that number
and tags as launch tags the node's jobs, so `cancel`, the controller's stop and the agent's
own kills (preemption, stall) reach the job on it, wherever the controller placed it; the
agents' events are the node's that was read, whatever its files say."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import tagged_pids

from mlcloud import state, templates
from mlcloud.control import nodeevents
from mlcloud.control import policy as pol
from mlcloud.control.controller import Controller
from mlcloud.jobs import cancel, launch
from mlcloud.provision import handle, lifecycle
from mlcloud.report import PlainReporter
from mlcloud.spec.task import TaskSpec

QUIET = PlainReporter(quiet=True)


def _replaced(name: str, lose: int) -> tuple[state.Store, handle.Handle]:
    """A 2-node local cluster whose node at position `lose` was lost and replaced."""
    store = state.open_store()
    lifecycle.up(store, name, TaskSpec(provider="local", nodes=2), QUIET)
    h = handle.open_cluster(store, name)
    lifecycle.terminate(h.provider, h.ref, [handle.provider_node(h.nodes[lose])], h.record)
    assert Controller(store, h, QUIET).step(time.time()).kinds() == [pol.REPLACE]
    return store, h


def _agent_config(root: str) -> dict:
    return json.loads((Path(root) / "agent" / "config.json").read_text())


def test_a_replacement_never_takes_a_number_the_cluster_used(mlcloud_home):
    """node-1, the highest, lost: its replacement is node-2, not node-1 again (a teardown of
    node-1 still under way would take the new one), and its agent knows it as node 2."""
    store, h = _replaced("renum", lose=1)
    try:
        roots = [Path(n.root).name for n in h.nodes]
        assert roots == ["node-0", "node-2"], roots
        conf = _agent_config(h.nodes[1].root)
        assert conf["node"] == 2, conf  # not its place in the batch it was made in (0)
        assert conf["tag"] == launch.node_tag(h, 1) == f"{h.record.uid}.2."
        # the next goes on from there, though node-2, the highest that was, is gone
        lifecycle.terminate(h.provider, h.ref, [handle.provider_node(h.nodes[1])], h.record)
        assert Controller(store, h, QUIET).step(time.time()).kinds() == [pol.REPLACE]
        assert Path(h.nodes[1].root).name == "node-3"
    finally:
        h.close()
        lifecycle.down(store, "renum", QUIET)


def test_numbers_are_handed_out_once(mlcloud_home):
    store = state.open_store()
    store.create_cluster("n", "n-1", "local", {}, "o")
    assert store.number_nodes("n", 2) == 0
    assert store.number_nodes("n", 1) == 2
    assert store.number_nodes("n", 1, floor=7) == 7  # nodes made before the count was kept
    assert store.number_nodes("n", 0, floor=3) == 8


def test_an_agents_events_are_the_node_that_was_read(mlcloud_home):
    """A node's events.jsonl says node 0 (what a node made later was once told): the event is
    merged as the node whose files were read."""
    store, h = _replaced("attr", lose=0)
    try:
        node = h.nodes[0]  # the replacement, placed first
        with open(Path(node.root) / "agent" / "events.jsonl", "a") as f:
            f.write(json.dumps({"time": 5.0, "kind": "stall", "node": 7, "message": "x"}) + "\n")
        nodeevents.gather(store, h)
        stalls = [(n, m) for _, k, n, m in store.event_log("attr", h.record.uid) if k == "stall"]
        assert stalls == [(node.idx, "x")], stalls
    finally:
        h.close()
        lifecycle.down(store, "attr", QUIET)


CTL = str(templates.path("node_ctl.py"))


def _start_everywhere(store: state.Store, h: handle.Handle, tmp_path: Path) -> state.JobRecord:
    """A job on every node, as launch_on starts it (job.json with launch's tag), its part a
    sleep rather than torchrun."""
    job = store.new_job(h.record.name, h.record.uid, "sleep", len(h.nodes), 1, tmp_path)
    req = launch.JobRequest(tmp_path, "train.py", (), None, {}, None, None)
    for i, n in enumerate(h.nodes):
        jd = Path(launch.job_dir(n.root, job.job_id))
        jd.mkdir(parents=True)
        spec = launch.node_job(h, req, job.job_id, i, 29500, 1)
        spec.update(argv=["sleep", "600"], cwd=str(jd))
        (jd / "job.json").write_text(json.dumps(spec))
        subprocess.run([sys.executable, CTL, "start", str(jd)], check=True, timeout=60)
    store.update_job(h.record.name, h.record.uid, job.job_id, status=state.JOB_RUNNING)
    return job


def test_cancel_reaches_the_job_on_a_replacement(mlcloud_home, tmp_path):
    store, h = _replaced("cancel", lose=1)
    uid = h.record.uid
    try:
        job = _start_everywhere(store, h, tmp_path)
        new = h.nodes[1]
        on_new = f"{uid}.{Path(new.root).name.split('-')[1]}.{job.job_id}."
        assert tagged_pids(on_new), "the job did not start on the replacement"
        # the agent there kills (preemption, stall) by its config's tag: the job's
        assert on_new.startswith(_agent_config(new.root)["tag"])
        done, was_running = cancel.cancel(store, "cancel", job.job_id, grace=1.0)
        assert was_running and done.status == state.JOB_CANCELLED
        assert tagged_pids(f"{uid}.") == []  # on every node, the replacement's included
        assert (Path(launch.job_dir(new.root, job.job_id)) / "cancelled").exists()
    finally:
        h.close()
        lifecycle.down(store, "cancel", QUIET)


def test_the_controllers_stop_reaches_the_job_on_a_replacement(mlcloud_home, tmp_path):
    store, h = _replaced("stop", lose=1)
    uid = h.record.uid
    try:
        _start_everywhere(store, h, tmp_path)
        assert all(tagged_pids(launch.node_tag(h, i)) for i in range(2))
        Controller(store, h, QUIET)._stop_job(range(len(h.nodes)), grace=1.0)  # stall-stop's
        assert tagged_pids(f"{uid}.") == []
    finally:
        h.close()
        lifecycle.down(store, "stop", QUIET)


def test_a_lost_local_node_leaves_nothing_running_beside_its_replacement(mlcloud_home, tmp_path):
    """Through the CLI: node1's directory is removed under its running agent and job (its
    agent polls slowly, so it would not notice for a while); `autoscale --once` replaces it
    with a node of a new number, says so truthfully, configures the new agent with that
    number, and stops what the lost node left running (agent and job) there and then."""
    from conftest import run_cli

    spec = tmp_path / "mlcloud.yaml"
    spec.write_text("autoscale:\n  poll_seconds: 120\n")
    r = run_cli("up", "gone", "--nodes", "2", "--yes", "-f", str(spec))
    assert r.returncode == 0, r.stderr
    store = state.open_store()
    h = handle.open_cluster(store, "gone")
    try:
        uid = h.record.uid
        lost = Path(h.nodes[1].root)
        agent = int((lost / "agent" / "agent.pid").read_text())
        _start_everywhere(store, h, tmp_path)
        assert tagged_pids(f"{uid}.1.")
    finally:
        h.close()
    # the node's job and agent still write there: a file may go (or come) while it is removed
    deadline = time.monotonic() + 30
    while lost.exists() and time.monotonic() < deadline:
        shutil.rmtree(lost, ignore_errors=True)
    assert not lost.exists()
    said = ""
    for _ in range(2):  # the listing's loss may take a second look
        r = run_cli("autoscale", "gone", "--once")
        assert r.returncode == 0, r.stderr
        said += r.stdout + r.stderr
        if "replaced by" in said:
            break
    assert "node1: local-1 replaced by local-2" in said, said
    assert tagged_pids(f"{uid}.1.") == [], "the lost node's job runs on"
    assert not _alive(agent), "the lost node's agent runs on beside its replacement"
    h = handle.open_cluster(store, "gone")
    try:
        assert [Path(n.root).name for n in h.nodes] == ["node-0", "node-2"]
        conf = _agent_config(h.nodes[1].root)
        assert (conf["node"], conf["node_id"], conf["tag"]) == (2, "local-2", f"{uid}.2.")
    finally:
        h.close()
    assert run_cli("down", "gone", "--yes").returncode == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
