"""The controller's events name the node they are about (`events --json`: `node`), in process
on the local provider."""

from __future__ import annotations

import time

from mlcloud import cluster, state
from mlcloud.autoscale import policy as pol
from mlcloud.autoscale.controller import Controller
from mlcloud.report import PlainReporter
from mlcloud.spec import TaskSpec

QUIET = PlainReporter(quiet=True)


def test_a_replaced_node_is_named_in_its_events():
    store = state.open_store()
    cluster.up(store, "ev", TaskSpec(provider="local", nodes=2), QUIET)
    h = cluster.open_cluster(store, "ev")
    h.provider.terminate(h.ref, [cluster.provider_node(h.nodes[1])])  # node1 vanishes
    try:
        assert Controller(store, h, QUIET).step(time.time()).kinds() == [pol.REPLACE]
        mine = {k: n for _, k, n, _ in store.event_log("ev", h.record.uid)}
        assert mine["node lost"] == 1 and mine["node replaced"] == 1, mine
    finally:
        h.close()
        cluster.down(store, "ev", QUIET)
