"""The controller resizing a cluster in process (local provider): a node gone from the
provider's listing stays gone, and every surviving node's agent is given the budget deadline
at the new rate."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlcloud import state
from mlcloud.control import policy as pol
from mlcloud.control.agentview import probe
from mlcloud.control.controller import Controller
from mlcloud.provision import bootstrap, handle, lifecycle
from mlcloud.remote.local import LocalTransport
from mlcloud.report import PlainReporter
from mlcloud.spec.task import AutoscaleSpec, TaskSpec

QUIET = PlainReporter(quiet=True)


def _deadline(root: str) -> float:
    return json.loads((Path(root) / "agent" / "config.json").read_text())["deadline"]


def test_a_dropped_node_moves_the_survivors_budget_deadline():
    # 2 nodes at $1/h each and $1 to spend: 30 min at 2 nodes, about an hour once one is gone
    spec = TaskSpec(
        provider="local", nodes=2, autoscale=AutoscaleSpec(max_cost=1.0, replace_lost=False)
    )
    store = state.open_store()
    t0 = time.time()
    lifecycle.up(store, "money", spec, QUIET, price=1.0)
    h = handle.open_cluster(store, "money")
    assert abs(_deadline(h.nodes[0].root) - (t0 + 1800)) < 5
    survivor = h.nodes[0].root

    # node1 vanishes, its processes first (a live agent's write raced the directory's removal)
    lifecycle.terminate(h.provider, h.ref, [handle.provider_node(h.nodes[1])], h.record)
    plan = Controller(store, h, QUIET).step(time.time())
    assert plan.kinds() == [pol.DROP]
    assert [n.root for n in h.nodes] == [survivor]

    billing = [i for i in store.billing("money") if i.uid == h.record.uid]
    assert sum(i.end is None for i in billing) == 1
    due = _deadline(survivor)
    assert abs(due - bootstrap.budget_deadline(1.0, billing, time.time())) < 5
    assert due > t0 + 3500  # what is left of $1 at $1/h, not the 2-node rate's 30 min
    lifecycle.down(store, "money", QUIET)


def test_a_probe_never_makes_a_removed_node_again(tmp_path):
    gone = tmp_path / "node-1"  # its directory was removed: the provider no longer lists it
    p = probe(LocalTransport("node1"), str(gone), time.time())
    assert p.reachable and p.samples == ()
    assert not gone.exists()
