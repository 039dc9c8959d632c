"""The controller's decisions as a pure function: `decide(snapshot, policy, now) -> Plan`.

No I/O and no clock of its own: the controller gathers the snapshot (provider listing,
reachability, agent verdicts, job, money) and applies the plan, so every rule tests with
synthetic snapshots and a fake clock. Each action carries the reason that becomes its event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mlcloud.providers import base
from mlcloud.spec.task import AutoscaleSpec

MISSING = "missing"  # the provider's listing no longer has the node at all
# What a listing says of a node that is gone or going.
GONE = base.GONE | {MISSING}

# Action kinds, in the order the controller applies them.
BUDGET_STOP = "budget_stop"  # checkpoint (SIGTERM), grace, terminate the cluster
IDLE_DOWN = "idle_teardown"  # no job, every node idle for idle_minutes: stop (as agents)
STALL = "stall"  # report a stalled job (event only)
STALL_STOP = "stall_stop"  # stop a stalled job (on_stall: stop)
RESTART = "restart"  # the head is gone: restart the job from its newest checkpoint, new head
REPLACE = "replace"  # a lost node: a new one (same zone first, or a spare) in its place
DROP = "drop"  # a lost node nothing can replace: the job goes on without it (elastic)
SHRINK = "shrink"  # checkpoint, then one node fewer: the cost rate would overrun max_cost
GROW = "grow"  # one node more, toward MAX


@dataclass(frozen=True)
class NodeView:
    """One node as the controller saw it this pass."""

    idx: int  # position in the cluster; 0 is the head (the rendezvous host)
    node_id: str
    provider_status: base.NodeStatus | Literal["missing"]  # as the provider's listing has it
    unreachable: int = 0  # consecutive failed reachability checks, this one included
    silent_s: float | None = None  # its connection heard nothing, heartbeats asked, this long
    verdict: str | None = None  # the agent's newest: idle|busy|stalled|starting, None: no agent
    idle_since: float | None = None  # start of the agent's unbroken run of idle verdicts
    stalled_since: float | None = None  # likewise for stalled
    # the running job's processes there are gone though the node answers (killed, OOM): lost
    # for the job, whose survivors would otherwise wait in torchrun's exit barrier (300 s)
    job_gone: bool = False


@dataclass(frozen=True)
class JobView:
    job_id: int
    running: bool
    remaining_s: float | None = None  # expected time to the end (from progress), None: unknown


@dataclass(frozen=True)
class Snapshot:
    cluster: str
    nodes: tuple[NodeView, ...]
    job: JobView | None
    cost_so_far: float  # USD billed since the cluster came up
    node_rate: float  # USD/h of one node
    min_nodes: int  # elastic MIN (== MAX for a fixed size); the size it was made with
    max_nodes: int
    spares: int | None = None  # ssh: free hosts; None: a cloud (capacity is found by asking)
    ended_at: float | None = None  # when the last job ended (idle teardown counts from there)
    grow_refusals: int = 0  # growth refused in a row (no capacity, quota)
    grow_refused_at: float | None = None  # when the last refusal came

    @property
    def rate(self) -> float:
        """USD/h now: every node still listed bills."""
        return self.node_rate * len(self.nodes)


_SPEC = AutoscaleSpec()


@dataclass(frozen=True)
class Policy:
    """The spec's `autoscale:` keys the controller reads, with the spec's defaults: one
    default per setting, so a stored spec without a key gets what the node agent gets."""

    poll_seconds: float = _SPEC.poll_seconds
    idle_minutes: float = _SPEC.idle_minutes
    stall_minutes: float = _SPEC.stall_minutes
    on_stall: str = _SPEC.on_stall
    max_cost: float | None = _SPEC.max_cost
    replace_lost: bool = _SPEC.replace_lost
    lost_after: int = 2  # consecutive unreachable checks before a node counts as lost

    @classmethod
    def from_spec(cls, spec: dict) -> Policy:
        """From a spec as state stores it; keys it lacks keep their defaults."""
        auto = dict(spec.get("autoscale") or {})
        known = {k: auto[k] for k in cls.__dataclass_fields__ if auto.get(k) is not None}
        return cls(**known)


@dataclass(frozen=True)
class Action:
    kind: str
    reason: str
    node: int | None = None  # the node's position, where one applies


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = field(default=())

    def kinds(self) -> list[str]:
        return [a.kind for a in self.actions]


def lost_reason(n: NodeView, policy: Policy) -> str | None:
    """Why a node counts as lost, or None: the provider says it is gone (the cloud is the
    truth), its connection heard nothing for the heartbeat's timeout though asked (a silent
    cut: already timed, so at once), or it did not answer `lost_after` checks in a row."""
    if n.provider_status in GONE:
        return f"the provider lists it as {n.provider_status}"
    if n.silent_s is not None:
        return f"silent for {n.silent_s:g} s though asked (no answer, heartbeats included)"
    if n.unreachable >= policy.lost_after:
        return f"unreachable for {n.unreachable} consecutive checks"
    return None


def _projected(snap: Snapshot, nodes: int) -> float | None:
    """Cost at the job's expected end with this many nodes, None when the end is unknown.
    The remaining time is the one measured on the nodes it runs on now, whatever `nodes` is:
    a job of fixed steps (the template's: each step's batch is per rank) takes as long on one
    node more or fewer, so growth is priced at its most and a shrink saves one node's rate."""
    if snap.job is None or not snap.job.running or snap.job.remaining_s is None:
        return None
    return snap.cost_so_far + snap.node_rate * nodes * snap.job.remaining_s / 3600


# Growth must leave this share of max_cost unspent at the projected end: a resize restarts the
# job's workers from their checkpoint, so an estimate wobbling near the limit must not grow,
# then shrink, then grow again.
GROW_HEADROOM = 0.1


def _spendable(snap: Snapshot, nodes: int, max_cost: float, poll_seconds: float) -> float:
    """What the job may spend by its end on this many nodes: max_cost less the one poll of
    spend the budget stop keeps back (it stops the job that much early)."""
    return max_cost - snap.node_rate * nodes * poll_seconds / 3600


def _in(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


GROW_BACKOFF_S = 60.0  # after a refused growth, wait this long, doubling per refusal
GROW_BACKOFF_MAX_S = 900.0


def grow_backoff(refusals: int) -> float:
    """Seconds to hold growth back after `refusals` refusals in a row."""
    if refusals <= 0:
        return 0.0
    return min(GROW_BACKOFF_S * 2 ** (refusals - 1), GROW_BACKOFF_MAX_S)


PASS_BACKOFF_MAX_S = 300.0  # a controller whose passes keep failing asks at most every 5 min


def pass_wait(failures: int, every: float) -> float:
    """Seconds from one controller pass to the next after `failures` failed passes in a row:
    the poll interval, doubled per failure, capped (a cloud or node refusing every pass is not
    asked again every poll)."""
    return min(every * 2**failures, max(every, PASS_BACKOFF_MAX_S))


def decide(snap: Snapshot, policy: Policy, now: float) -> Plan:
    """What to do this pass, with why. A budget stop or an idle teardown is the whole plan."""
    running = snap.job is not None and snap.job.running
    # Budget: stop one poll's spend early, so the last poll cannot carry the cost over.
    if policy.max_cost is not None:
        next_poll = snap.rate * policy.poll_seconds / 3600
        if snap.cost_so_far + next_poll >= policy.max_cost:
            return Plan(
                (
                    Action(
                        BUDGET_STOP,
                        f"spent ${snap.cost_so_far:.2f} of max_cost ${policy.max_cost:.2f} "
                        f"(${snap.rate:.2f}/h): checkpointing, then tearing down",
                    ),
                )
            )
    # Idle: no job and every node idle for idle_minutes (the agent's verdict, or no job since
    # the last one ended when no agent speaks).
    if not running and snap.nodes:
        window = policy.idle_minutes * 60
        starts = [n.idle_since for n in snap.nodes]
        if snap.ended_at is not None:
            starts = [max(s, snap.ended_at) if s is not None else None for s in starts]
        if all(s is not None and now - s >= window for s in starts):
            return Plan(
                (
                    Action(
                        IDLE_DOWN,
                        f"no job and every node idle for {policy.idle_minutes:g} min: tearing down",
                    ),
                )
            )
    actions: list[Action] = []
    # Stall: a running job whose nodes have said "stalled" for stall_minutes.
    if running:
        window = policy.stall_minutes * 60
        stalled = [
            n for n in snap.nodes if n.stalled_since is not None and now - n.stalled_since >= window
        ]
        if stalled:
            where = ", ".join(f"node{n.idx}" for n in stalled)
            if policy.on_stall == "stop":
                actions.append(
                    Action(STALL_STOP, f"job stalled on {where} for {policy.stall_minutes:g} min")
                )
            else:
                actions.append(
                    Action(
                        STALL,
                        f"job stalled on {where} for {policy.stall_minutes:g} min "
                        "(on_stall: report)",
                    )
                )
    # Lost nodes.
    lost = [(n, why) for n in snap.nodes if (why := lost_reason(n, policy))]
    alive = len(snap.nodes) - len(lost)
    spares = snap.spares
    head_lost = any(n.idx == 0 for n, _ in lost)
    if head_lost and running and alive > 0:
        actions.append(
            Action(
                RESTART,
                "the head node is lost: restarting the job from its newest checkpoint "
                "with a new head",
                0,
            )
        )
    gone = [n for n in snap.nodes if n.job_gone and not lost_reason(n, policy)]
    if gone and running and not head_lost:
        where = ", ".join(f"node{n.idx} ({n.node_id})" for n in gone)
        actions.append(
            Action(
                RESTART,
                f"the job's processes on {where} are gone (the node answers): restarting the "
                f"job from its newest checkpoint on {alive} node(s)",
                gone[0].idx,
            )
        )
    # No job, and the nodes still up idle for about idle_minutes: the lost ones stopped
    # themselves (the agents' idle switch, one after the other); a replacement would only idle
    # out in turn. A node lost from a cluster idle for less than that is replaced.
    quiet = not running and all(
        n.idle_since is not None
        and now - n.idle_since >= policy.idle_minutes * 60 - 2 * policy.poll_seconds
        for n in snap.nodes
        if not lost_reason(n, policy)
    )
    for n, why in lost:
        can = policy.replace_lost and (spares is None or spares > 0) and not quiet
        if can:
            if spares is not None:
                spares -= 1
            actions.append(Action(REPLACE, f"node{n.idx} ({n.node_id}) lost: {why}", n.idx))
        else:
            because = (
                "no job runs and the other nodes are idle: not replaced"
                if quiet
                else "replace_lost is off"
                if not policy.replace_lost
                else "no spare left"
            )
            actions.append(Action(DROP, f"node{n.idx} ({n.node_id}) lost: {why}; {because}", n.idx))
    held_back = snap.grow_refused_at is not None and now < snap.grow_refused_at + grow_backoff(
        snap.grow_refusals
    )  # the cloud said no a moment ago: not every poll again
    size = len(snap.nodes)
    if not lost and size < snap.min_nodes:
        # below the size it was made with: a lost node no place could replace then (no
        # capacity in any zone) is replaced once one can, job or not
        if policy.replace_lost and not quiet and not held_back and (spares is None or spares > 0):
            why = f"{size} of {snap.min_nodes} nodes: one node more in place of one lost"
            actions.append(Action(GROW, why))
        return Plan(tuple(actions))
    if lost or not running or snap.min_nodes == snap.max_nodes:
        return Plan(tuple(actions))
    # Elastic size: shrink when the rate would overrun max_cost before the job's end; grow
    # toward MAX while capacity and budget allow. Without an expected end (no progress signal,
    # or no advance) only the budget stop above guards max_cost: nothing shrinks, and growth
    # under a max_cost waits for an estimate.
    remaining = snap.job.remaining_s if snap.job is not None else None
    if policy.max_cost is not None:
        at_size = _projected(snap, size)
        limit = _spendable(snap, size, policy.max_cost, policy.poll_seconds)
        if at_size is not None and remaining is not None and at_size > limit:
            if size > snap.min_nodes:
                actions.append(
                    Action(
                        SHRINK,
                        f"${at_size:.2f} expected at the job's end (in {_in(remaining)}, by its "
                        f"progress) on {size} nodes is over max_cost ${policy.max_cost:.2f}: "
                        "checkpointing, then one node fewer",
                        size - 1,
                    )
                )
            return Plan(tuple(actions))  # over budget at this size: never one node more
    if held_back:
        return Plan(tuple(actions))
    if size < snap.max_nodes and (spares is None or spares > 0) and remaining != 0:
        # (a job that reads done gets no node more: it would only join the job's end)
        if policy.max_cost is None:
            why = "capacity allows"
        else:
            bigger = _projected(snap, size + 1)
            room = _spendable(snap, size + 1, policy.max_cost, policy.poll_seconds)
            room -= GROW_HEADROOM * policy.max_cost
            if bigger is None or remaining is None or bigger > room:
                return Plan(tuple(actions))  # the budget does not admit one node more
            why = (
                f"${bigger:.2f} expected at the job's end (in {_in(remaining)}) on {size + 1} "
                f"nodes is within max_cost ${policy.max_cost:.2f}, "
                f"{GROW_HEADROOM:.0%} of it to spare"
            )
        actions.append(Action(GROW, f"{size} of {snap.max_nodes} nodes and {why}: one node more"))
    return Plan(tuple(actions))
