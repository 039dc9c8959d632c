"""The controller's events name the node they are about (`events --json`: `node`), in process
on the local provider."""

from __future__ import annotations

import time

from mlcloud import state
from mlcloud.control import policy as pol
from mlcloud.control.controller import Controller
from mlcloud.provision import handle, lifecycle
from mlcloud.report import PlainReporter
from mlcloud.spec.task import TaskSpec

QUIET = PlainReporter(quiet=True)


def test_a_replaced_node_is_named_in_its_events():
    store = state.open_store()
    lifecycle.up(store, "ev", TaskSpec(provider="local", nodes=2), QUIET)
    h = handle.open_cluster(store, "ev")
    lifecycle.terminate(h.provider, h.ref, [handle.provider_node(h.nodes[1])], h.record)
    try:
        assert Controller(store, h, QUIET).step(time.time()).kinds() == [pol.REPLACE]
        mine = {k: n for _, k, n, _ in store.event_log("ev", h.record.uid)}
        assert mine["node_lost"] == 1 and mine["node_replaced"] == 1, mine
    finally:
        h.close()
        lifecycle.down(store, "ev", QUIET)


def test_a_second_controller_does_not_replace_a_node_again():
    """`autoscale --once` from cron while `train` runs its own controller: the second one's
    view of the cluster is stale once the first replaced a node; it must not replace the same
    loss again (which left the first replacement running, forgotten by state)."""
    store = state.open_store()
    lifecycle.up(store, "two", TaskSpec(provider="local", nodes=2), QUIET)
    first, second = handle.open_cluster(store, "two"), handle.open_cluster(store, "two")
    lifecycle.terminate(
        first.provider, first.ref, [handle.provider_node(first.nodes[0])], first.record
    )
    try:
        assert Controller(store, first, QUIET).step(time.time()).kinds() == [pol.REPLACE]
        assert Controller(store, second, QUIET).step(time.time()).kinds() == []
        listed = [n.node_id for n in first.provider.list(first.ref)]
        assert sorted(listed) == sorted(n.node_id for n in store.get_cluster("two").nodes)
        assert len(listed) == 2
    finally:
        first.close()
        second.close()
        lifecycle.down(store, "two", QUIET)


def test_the_head_lost_on_local_is_replaced():
    """node-0's directory gone, node-1 left: the replacement is a new directory (node-2), not
    node-1 made again over the survivor."""
    store = state.open_store()
    lifecycle.up(store, "head", TaskSpec(provider="local", nodes=2), QUIET)
    h = handle.open_cluster(store, "head")
    survivor = h.nodes[1].node_id
    lifecycle.terminate(h.provider, h.ref, [handle.provider_node(h.nodes[0])], h.record)
    try:
        assert Controller(store, h, QUIET).step(time.time()).kinds() == [pol.REPLACE]
        ids = [n.node_id for n in store.get_cluster("head").nodes]
        assert ids[1] == survivor and ids[0] not in ("local-0", survivor), ids
        assert sorted(n.node_id for n in h.provider.list(h.ref)) == sorted(ids)
    finally:
        h.close()
        lifecycle.down(store, "head", QUIET)
