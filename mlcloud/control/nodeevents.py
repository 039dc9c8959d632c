"""What the node agents decided, brought into local state: their events merge into the event
log (once each), and a node whose dead-man switch fired is marked terminated with its reason
(its billing closes when the last node stopped). `status NAME` and `events` call this."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from mlcloud import state
from mlcloud.control import agentview
from mlcloud.control.agentview import Event, NodeView, Stopped
from mlcloud.errors import MlcloudError, UsageError
from mlcloud.parallel import fan_out
from mlcloud.providers.base import TERMINATED

if TYPE_CHECKING:
    from mlcloud.provision.handle import Handle

ASK_TIMEOUT = 5.0  # seconds per node: `status` stays quick when a node does not answer


def refresh(store: state.Store, rec: state.ClusterRecord) -> dict[int, Stopped]:
    """`gather` for a caller that holds no Handle (`status`, `events`): opens the cluster only
    when it is UP, and closes it again."""
    if rec.status != state.UP:
        return {}
    from mlcloud.provision.handle import open_cluster

    with open_cluster(store, rec.name) as h:
        return gather(store, h)


def gather(store: state.Store, h: Handle) -> dict[int, Stopped]:
    """Ask the nodes still thought running (in parallel, briefly) for their agent's events and
    stop record; merge them into state and into `h.record`. Returns the nodes found stopped. A
    node that cannot be asked is left as it was (the controller tells lost nodes apart),
    unless it is a machine mlcloud owns that its cloud lists as gone."""
    rec = h.record
    live = [i for i, n in enumerate(rec.nodes) if n.status != TERMINATED]

    def one(i: int) -> NodeView | None:
        try:
            return agentview.read(h.transports[i], h.nodes[i].root, i, timeout=ASK_TIMEOUT)
        except MlcloudError:
            return None

    answers = fan_out(one, live)
    views = [v for v in answers if v is not None]
    silent = [i for i, v in zip(live, answers, strict=True) if v is None]
    gone = _gone_from_the_cloud(h, silent)
    # each event is the node's whose files were read, as state places it: never the number
    # the file says (a node made later was once told its place in its batch)
    store.merge_events(
        rec.name,
        rec.uid,
        [(e.time, e.kind, rec.nodes[v.node].idx, e.message) for v in views for e in v.events]
        + [(g.time, g.kind, rec.nodes[i].idx, g.reason) for i, g in gone.items()],
    )
    stopped = {v.node: v.stopped for v in views if v.stopped is not None} | gone
    for i, g in gone.items():
        store.close_node_billing(rec.uid, rec.nodes[i].node_id, g.time)
    if stopped:
        nodes = [
            replace(n, status=TERMINATED) if i in stopped else n for i, n in enumerate(rec.nodes)
        ]
        store.set_nodes(rec.name, nodes)
        h.record = replace(rec, nodes=tuple(nodes))
        if all(n.status == TERMINATED for n in nodes):
            store.close_billing(rec.uid, max(s.time for s in stopped.values()))
    return stopped


def _gone_from_the_cloud(h: Handle, silent: list[int]) -> dict[int, Stopped]:
    """A machine mlcloud owns that does not answer and that its cloud lists as terminated (or
    no longer lists) is terminated: an EC2 node whose agent powered it off takes its stop
    record with it, so the cloud's word is all there is. Asked only when a node is silent."""
    if not silent or not h.provider.capabilities.owns_machines:
        return {}
    from mlcloud.control.policy import GONE, MISSING

    try:
        listed = {n.node_id: n.status for n in h.provider.list(h.ref)}
    except MlcloudError:
        return {}
    now = time.time()
    out = {}
    for i in silent:
        status = listed.get(h.nodes[i].node_id, MISSING)
        if status in GONE:
            why = (
                f"the provider lists it as {status} and it does not answer: it stopped itself "
                "(idle, budget or lost heartbeat: its record went with the machine) or was "
                "reclaimed"
            )
            out[i] = Stopped(now, TERMINATED, why)
    return out


def log(store: state.Store, rec: state.ClusterRecord) -> list[Event]:
    """The cluster's events (this incarnation's), oldest first."""
    return [
        Event(t, kind, node, message)
        for t, kind, node, message in store.event_log(rec.name, rec.uid)
    ]


def stop_reasons(events: list[Event]) -> dict[int, str]:
    """node -> why its agent stopped it, from the events (the last stop event of each node)."""
    kinds = {"idle_teardown", "budget_stop", "heartbeat_lost", TERMINATED}
    return {
        e.node: f"{e.kind}: {e.message}" for e in events if e.kind in kinds and e.node is not None
    }


def refuse_stopped(store: state.Store, rec: state.ClusterRecord) -> None:
    """A job on a node its agent (or a rule) stopped would run with no agent watching it: no
    idle teardown, no budget deadline. Refuse in one line, with the reason and the way out."""
    stopped = [n.idx for n in rec.nodes if n.status == TERMINATED]
    if not stopped:
        return
    i = stopped[0]
    why = stop_reasons(log(store, rec)).get(i, "stopped")
    raise UsageError(
        f"cluster {rec.name}: node{i} was stopped ({why.split(';')[0]}); "
        f"`mlcloud down {rec.name}`, then `mlcloud up {rec.name}` for a new cluster"
    )


STOPPED, DEGRADED = "STOPPED", "DEGRADED"  # what `status` shows of an UP cluster, beyond UP


def health(rec: state.ClusterRecord, reasons: dict[int, str]) -> tuple[str, str | None]:
    """The status a person or a CI step reads, and why: an UP cluster whose every node stopped
    (idle, budget, dead-man, reclaimed) is STOPPED, with the first node's reason; one with
    nodes stopped or lost (dropped below the size it was made with: the elastic MIN) is
    DEGRADED, with the count. Anything else is the row's own status. reasons: stop_reasons."""
    from mlcloud.providers.base import GONE
    from mlcloud.spec.task import parse_nodes

    if rec.status != state.UP or not rec.nodes:
        return rec.status, None
    gone = [n for n in rec.nodes if n.status in GONE]
    if len(gone) == len(rec.nodes):
        first = gone[0]
        return STOPPED, reasons.get(first.idx, f"node{first.idx} is {first.status}")
    asked = rec.spec.get("nodes")
    low, high = parse_nodes(asked) if asked is not None else (None, len(rec.nodes))
    want = low if low is not None else high
    lost = len(gone) + max(0, want - len(rec.nodes))
    if lost:
        return DEGRADED, f"{lost} of {max(want, len(rec.nodes))} node(s) lost or stopped"
    return rec.status, None
