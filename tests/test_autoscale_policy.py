"""The controller's pure policy, table-driven over synthetic snapshots with a fake clock:
every rule fires, and every rule also holds back."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mlcloud.control.policy import (
    BUDGET_STOP,
    DROP,
    GROW,
    IDLE_DOWN,
    REPLACE,
    RESTART,
    SHRINK,
    STALL,
    STALL_STOP,
    JobView,
    NodeView,
    Plan,
    Policy,
    Snapshot,
    decide,
    lost_reason,
)
from mlcloud.spec.task import AutoscaleSpec

NOW = 1_000_000.0
RUNNING = JobView(7, True)


def node(i: int, **kw) -> NodeView:
    return NodeView(i, f"n{i}", kw.pop("status", "running"), **kw)


def snap(n: int = 2, job: JobView | None = RUNNING, **kw) -> Snapshot:
    nodes = kw.pop("nodes", tuple(node(i, verdict="busy") for i in range(n)))
    d = dict(
        cluster="c", nodes=nodes, job=job, cost_so_far=1.0, node_rate=3.6, min_nodes=n, max_nodes=n
    )
    d.update(kw)
    return Snapshot(**d)


RUN = JobView(7, True)
RUN_LONG = JobView(7, True, remaining_s=3600.0)
DONE = JobView(7, False)
IDLE_NODES = (
    node(0, verdict="idle", idle_since=NOW - 700),
    node(1, verdict="idle", idle_since=NOW - 650),
)

CASES = [
    # (id, snapshot, policy, expected kinds)
    ("healthy-nothing", snap(), Policy(), []),
    # lost or preempted
    (
        "provider-terminated-replaced",
        snap(nodes=(node(0), node(1, status="terminated"))),
        Policy(),
        [REPLACE],
    ),
    (
        "provider-missing-replaced",
        snap(nodes=(node(0), node(1, status="missing"))),
        Policy(),
        [REPLACE],
    ),
    (
        "unreachable-twice-replaced",
        snap(nodes=(node(0), node(1, unreachable=2))),
        Policy(),
        [REPLACE],
    ),
    ("unreachable-once-holds", snap(nodes=(node(0), node(1, unreachable=1))), Policy(), []),
    (
        "silent-once-replaced",  # its connection timed 8 s of silence: no second pass needed
        snap(nodes=(node(0), node(1, unreachable=1, silent_s=8.0))),
        Policy(),
        [REPLACE],
    ),
    (
        "no-spare-dropped",
        snap(nodes=(node(0), node(1, unreachable=3)), spares=0),
        Policy(),
        [DROP],
    ),
    (
        "spare-used",
        snap(nodes=(node(0), node(1, unreachable=3)), spares=1),
        Policy(),
        [REPLACE],
    ),
    (
        "one-spare-two-lost",
        snap(3, nodes=(node(0), node(1, unreachable=2), node(2, status="stopped")), spares=1),
        Policy(),
        [REPLACE, DROP],
    ),
    (
        "no-job-rest-idle-dropped-not-replaced",  # the agents' idle stops, one after the other
        snap(nodes=(node(0, idle_since=NOW - 1795), node(1, status="terminated")), job=DONE),
        Policy(),  # idle 30 min: node1's agent stopped it a moment before node0's will
        [DROP],
    ),
    (
        "no-job-rest-idle-briefly-replaced",  # a fresh cluster losing a node before its job
        snap(nodes=(node(0, idle_since=NOW - 60), node(1, status="terminated")), job=None),
        Policy(),
        [REPLACE],
    ),
    (
        "no-job-all-gone-dropped-not-replaced",
        snap(nodes=(node(0, status="terminated"), node(1, status="terminated")), job=None),
        Policy(),
        [DROP, DROP],
    ),
    (
        "no-job-rest-busy-replaced",
        snap(nodes=(node(0, verdict="busy"), node(1, status="terminated")), job=None),
        Policy(),
        [REPLACE],
    ),
    (
        "replace-lost-off",
        snap(nodes=(node(0), node(1, status="terminated"))),
        Policy(replace_lost=False),
        [DROP],
    ),
    # head lost
    (
        "head-lost-restart",
        snap(nodes=(node(0, unreachable=2), node(1))),
        Policy(),
        [RESTART, REPLACE],
    ),
    # a node answers but the job's processes on it are gone: restart on what is left
    (
        "job-gone-restart",
        snap(nodes=(node(0), node(1, job_gone=True)), min_nodes=1),
        Policy(),
        [RESTART],
    ),
    (
        "job-gone-on-the-head-restart",
        snap(nodes=(node(0, job_gone=True), node(1)), min_nodes=1),
        Policy(),
        [RESTART],
    ),
    (
        "job-gone-no-job-nothing",
        snap(nodes=(node(0), node(1, job_gone=True)), job=DONE, ended_at=NOW),
        Policy(),
        [],
    ),
    (
        "job-gone-and-head-lost-one-restart",
        snap(nodes=(node(0, unreachable=2), node(1, job_gone=True))),
        Policy(),
        [RESTART, REPLACE],
    ),
    (
        "head-lost-no-job-no-restart",
        snap(nodes=(node(0, unreachable=2), node(1)), job=DONE, ended_at=NOW),
        Policy(),
        [REPLACE],
    ),
    # budget stop: at max_cost minus one poll of spend
    ("budget-stop", snap(cost_so_far=9.995), Policy(max_cost=10.0), [BUDGET_STOP]),
    ("budget-holds-two-polls-early", snap(cost_so_far=9.985), Policy(max_cost=10.0), []),
    (
        "budget-stop-wins-over-lost",
        snap(nodes=(node(0), node(1, unreachable=5)), cost_so_far=10.0),
        Policy(max_cost=10.0),
        [BUDGET_STOP],
    ),
    # idle
    ("idle-down", snap(nodes=IDLE_NODES, job=None), Policy(idle_minutes=10), [IDLE_DOWN]),
    ("idle-holds-one-node-short", snap(nodes=IDLE_NODES, job=None), Policy(idle_minutes=11), []),
    ("idle-holds-while-job-runs", snap(nodes=IDLE_NODES, job=RUN), Policy(idle_minutes=10), []),
    (
        "idle-counts-from-job-end",
        snap(nodes=IDLE_NODES, job=DONE, ended_at=NOW - 60),
        Policy(idle_minutes=10),
        [],
    ),
    (
        "idle-holds-no-agent",
        snap(nodes=(node(0), node(1)), job=None),
        Policy(idle_minutes=0.01),
        [],
    ),
    # stall
    (
        "stall-report",
        snap(nodes=(node(0, verdict="stalled", stalled_since=NOW - 301), node(1))),
        Policy(stall_minutes=5),
        [STALL],
    ),
    (
        "stall-stop",
        snap(nodes=(node(0, verdict="stalled", stalled_since=NOW - 301), node(1))),
        Policy(stall_minutes=5, on_stall="stop"),
        [STALL_STOP],
    ),
    (
        "stall-holds-inside-window",
        snap(nodes=(node(0, verdict="stalled", stalled_since=NOW - 100), node(1))),
        Policy(stall_minutes=5),
        [],
    ),
    (
        "stall-report-after-the-specs-default",  # stall_minutes: 10, as the spec's default
        snap(nodes=(node(0, verdict="stalled", stalled_since=NOW - 601), node(1))),
        Policy(),
        [STALL],
    ),
    # grow and shrink (elastic 1:3, $3.6/h per node)
    ("grow-toward-max", snap(2, min_nodes=1, max_nodes=3), Policy(), [GROW]),
    ("grow-holds-at-max", snap(3, min_nodes=1, max_nodes=3), Policy(), []),
    (
        "grow-holds-after-a-refusal",
        snap(2, min_nodes=1, max_nodes=3, grow_refusals=1, grow_refused_at=NOW - 30),
        Policy(),
        [],
    ),
    (
        "grow-again-after-the-backoff",
        snap(2, min_nodes=1, max_nodes=3, grow_refusals=1, grow_refused_at=NOW - 61),
        Policy(),
        [GROW],
    ),
    (
        "grow-backoff-doubles",
        snap(2, min_nodes=1, max_nodes=3, grow_refusals=3, grow_refused_at=NOW - 200),
        Policy(),
        [],
    ),
    ("grow-holds-no-spare", snap(2, min_nodes=1, max_nodes=3, spares=0), Policy(), []),
    ("grow-holds-no-job", snap(2, job=None, min_nodes=1, max_nodes=3), Policy(), []),
    (
        "grow-within-budget",
        snap(2, job=RUN_LONG, min_nodes=1, max_nodes=3),
        # 1 + 3 x 3.6 = 11.8 <= 13.2 - 10% headroom (1.32) - one poll at 3 nodes (0.015)
        Policy(max_cost=13.2),
        [GROW],
    ),
    (
        "grow-holds-inside-the-headroom",  # within max_cost, but a wobble would shrink it back
        snap(2, job=RUN_LONG, min_nodes=1, max_nodes=3),
        Policy(max_cost=12.0),  # 11.8 > 12 - 1.2 - 0.015
        [],
    ),
    (
        "grow-holds-a-job-ending-in-budget",
        snap(2, job=JobView(7, True, remaining_s=600.0), min_nodes=1, max_nodes=3),
        Policy(max_cost=2.9),  # 1 + 3 x 0.6 = 2.8 <= 2.9, not with 10% to spare
        [],
    ),
    (
        "grow-a-job-ending-soon",
        snap(2, job=JobView(7, True, remaining_s=600.0), min_nodes=1, max_nodes=3),
        Policy(max_cost=3.2),  # 2.8 <= 3.2 - 0.32 - 0.015
        [GROW],
    ),
    (
        "grow-holds-over-budget",
        snap(2, job=RUN_LONG, min_nodes=1, max_nodes=3),
        Policy(max_cost=11.0),
        [],
    ),
    (
        "grow-holds-budget-end-unknown",
        snap(2, min_nodes=1, max_nodes=3),
        Policy(max_cost=100.0),
        [],
    ),
    (
        "shrink-over-budget",
        snap(3, job=RUN_LONG, min_nodes=1, max_nodes=3),
        Policy(max_cost=10.0),  # 1 + 3 x 3.6 = 11.8 > 10
        [SHRINK],
    ),
    (
        "grow-holds-a-job-that-reads-done",
        snap(2, job=JobView(7, True, remaining_s=0.0), min_nodes=1, max_nodes=3),
        Policy(max_cost=100.0),
        [],
    ),
    (
        "grow-holds-a-job-that-reads-done-without-max-cost",
        snap(2, job=JobView(7, True, remaining_s=0.0), min_nodes=1, max_nodes=3),
        Policy(),
        [],
    ),
    (
        "shrink-on-an-overrun-inside-the-last-poll",  # the budget stop would end it first
        snap(3, job=RUN_LONG, min_nodes=1, max_nodes=3),
        Policy(max_cost=11.81),  # 11.8 <= 11.81, but the stop keeps one poll back (0.015)
        [SHRINK],
    ),
    (
        "shrink-holds-budget-end-unknown",  # no progress signal: only the budget stop guards
        snap(3, job=RUN, min_nodes=1, max_nodes=3),
        Policy(max_cost=1.5),
        [],
    ),
    (
        "shrink-holds-a-job-about-to-end",
        snap(3, job=JobView(7, True, remaining_s=0.0), min_nodes=1, max_nodes=3),
        Policy(max_cost=1.5),
        [],
    ),
    (
        "shrink-holds-at-min",
        snap(1, job=RUN_LONG, min_nodes=1, max_nodes=3),
        Policy(max_cost=4.0),
        [],
    ),
    (
        "shrink-holds-within-budget",
        snap(3, job=RUN_LONG, min_nodes=1, max_nodes=3),
        Policy(max_cost=12.0),
        [],
    ),
    (
        "no-resize-while-a-node-is-lost",
        snap(2, nodes=(node(0), node(1, unreachable=2)), min_nodes=1, max_nodes=3),
        Policy(),
        [REPLACE],
    ),
    # below the size it was made with (a lost node no zone had room to replace): regrown
    ("regrow-a-fixed-size-no-job", snap(1, job=None, min_nodes=2, max_nodes=2), Policy(), [GROW]),
    ("regrow-to-an-elastic-min", snap(1, job=None, min_nodes=2, max_nodes=3), Policy(), [GROW]),
    (
        "regrow-holds-after-a-refusal",
        snap(1, job=None, min_nodes=2, max_nodes=2, grow_refusals=1, grow_refused_at=NOW - 30),
        Policy(),
        [],
    ),
    (
        "regrow-holds-replace-lost-off",
        snap(1, job=None, min_nodes=2, max_nodes=2),
        Policy(replace_lost=False),
        [],
    ),
    ("regrow-holds-no-spare", snap(1, min_nodes=2, max_nodes=2, spares=0), Policy(), []),
    (
        "regrow-holds-idle",  # the lost node stopped itself for idle: a new one would too
        snap(
            job=None,
            nodes=(node(0, verdict="idle", idle_since=NOW - 1795),),
            min_nodes=2,
            max_nodes=2,
        ),
        Policy(),
        [],
    ),
    ("regrow-holds-at-size", snap(2, job=None, min_nodes=2, max_nodes=2), Policy(), []),
]


@pytest.mark.parametrize(("case", "snapshot", "policy", "kinds"), CASES, ids=[c[0] for c in CASES])
def test_decide(case, snapshot, policy, kinds):
    plan = decide(snapshot, policy, NOW)
    assert plan.kinds() == kinds
    for a in plan.actions:
        assert a.reason  # every decision says why


def test_replace_names_the_node_and_why():
    plan = decide(snap(nodes=(node(0), node(1, unreachable=2))), Policy(), NOW)
    (a,) = plan.actions
    assert a.node == 1 and "n1" in a.reason and "unreachable for 2 consecutive checks" in a.reason


def test_budget_reason_says_spent_and_limit():
    (a,) = decide(snap(cost_so_far=10.0), Policy(max_cost=10.0), NOW).actions
    assert "$10.00" in a.reason and "checkpoint" in a.reason


def test_resize_reasons_say_the_projection_the_end_and_the_limit():
    (a,) = decide(
        snap(3, job=RUN_LONG, min_nodes=1, max_nodes=3), Policy(max_cost=10.0), NOW
    ).actions
    assert a.kind == SHRINK and a.node == 2
    assert "$11.80 expected at the job's end (in 60 min, by its progress) on 3 nodes" in a.reason
    assert "over max_cost $10.00" in a.reason and "checkpoint" in a.reason
    (a,) = decide(
        snap(2, job=RUN_LONG, min_nodes=1, max_nodes=3), Policy(max_cost=13.2), NOW
    ).actions
    assert a.kind == GROW
    assert "$11.80 expected at the job's end (in 60 min) on 3 nodes" in a.reason
    assert "within max_cost $13.20, 10% of it to spare" in a.reason


def _pass(size: int, cost: float, remaining: float | None, max_cost: float, t: float) -> Plan:
    s = snap(size, job=JobView(7, True, remaining_s=remaining), min_nodes=1, max_nodes=3)
    return decide(replace(s, cost_so_far=cost), Policy(max_cost=max_cost), t)


def test_a_job_projected_over_budget_shrinks_and_ends_within_it():
    """A fake clock over an hour-long job on 3 nodes at $3.60/h each with $10 to spend
    ($1 spent): its progress says 60 min more, $11.80 at 3 nodes. The controller shrinks to 2
    ($8.20 expected) at once, grows back only when what is left admits a third node with
    room to spare, never flaps, and the job ends within max_cost, never budget-stopped."""
    size, cost, remaining, resizes = 3, 1.0, 3600.0, []
    for k in range(61):
        plan = _pass(size, cost, remaining, 10.0, NOW + 60 * k)
        assert BUDGET_STOP not in plan.kinds()
        for kind in plan.kinds():
            size += {SHRINK: -1, GROW: 1}[kind]
            resizes.append((k, kind))
        cost += 3.6 * size * 60 / 3600
        remaining = max(0.0, remaining - 60)  # its steps take as long on fewer nodes
    # shrunk in the first pass; the third node back only for the last minutes
    assert resizes == [(0, SHRINK), (47, GROW)]
    assert cost <= 10.0


def test_an_estimate_wobbling_near_the_limit_does_not_resize_in_turn():
    """Each resize restarts the job from its checkpoint: an estimate that wobbles around what
    a third node would cost (50 min +- 1) must not grow it, then shrink it, pass after pass."""
    size, kinds = 2, []
    for k, remaining in enumerate([2950.0, 3050.0] * 5):
        plan = _pass(size, 1.0, remaining, 10.0, NOW + 5 * k)
        for kind in plan.kinds():
            size += {SHRINK: -1, GROW: 1}[kind]
        kinds += plan.kinds()
    assert kinds == [] and size == 2


def test_growth_waits_for_the_budget_to_admit_it():
    """On 2 of 3 nodes, $10 to spend: an hour left is no room for a third node; once the
    progress says 10 min (the job sped up), it is."""
    assert _pass(2, 1.0, 3600.0, 10.0, NOW).kinds() == []  # 1 + 10.8 > 8.985
    assert _pass(2, 1.0, None, 10.0, NOW).kinds() == []  # no estimate: no growth
    assert _pass(2, 1.0, 600.0, 10.0, NOW + 60).kinds() == [GROW]  # 1 + 1.8 <= 8.985


def test_decide_is_pure():
    s, p = snap(nodes=(node(0), node(1, status="terminated"))), Policy()
    assert decide(s, p, NOW) == decide(s, p, NOW)
    assert s == snap(nodes=(node(0), node(1, status="terminated")))


def test_lost_reason():
    p = Policy()
    assert lost_reason(node(0), p) is None
    assert "terminated" in lost_reason(node(0, status="terminated"), p)
    assert lost_reason(node(0, unreachable=1), p) is None
    assert lost_reason(node(0, unreachable=1), replace(p, lost_after=1))


def test_policy_from_spec():
    p = Policy.from_spec(
        {"autoscale": {"max_cost": 5.0, "idle_minutes": None, "heartbeat_minutes": 3}}
    )
    assert p.max_cost == 5.0 and p.idle_minutes == 30.0 and p.poll_seconds == 5.0
    assert Policy.from_spec({}) == Policy()


def test_failed_passes_back_off_doubling_to_five_minutes():
    from mlcloud.control.policy import pass_wait

    assert [pass_wait(f, 5.0) for f in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert pass_wait(0, 600.0) == 600.0  # a slower poll than the cap stays as it is
    assert pass_wait(3, 600.0) == 600.0


def test_the_controller_waits_longer_after_each_failed_pass_and_resets(monkeypatch):
    """run() with passes that fail three times, then succeed: the waits double, then fall
    back to the poll interval (a fake stop event records them instead of sleeping)."""
    from mlcloud.control.controller import Controller
    from mlcloud.errors import MlcloudError

    outcomes = [MlcloudError("x")] * 3 + [None, None]
    waits: list[float] = []

    class Stop:
        def is_set(self) -> bool:
            return not outcomes

        def wait(self, seconds: float) -> None:
            waits.append(round(seconds))

    class Quiet:
        def warn(self, message: str) -> None: ...

    def step(self):
        outcome = outcomes.pop(0)
        if outcome:
            raise outcome

    ctl = Controller.__new__(Controller)
    ctl.gone, ctl.report, ctl.detach = False, Quiet(), lambda: None
    monkeypatch.setattr(Controller, "step", step)
    ctl.run(interval=5.0, stop=Stop())
    assert waits == [10, 20, 40, 5, 5]


def test_policy_defaults_are_the_specs():
    """One default per setting: a cluster whose stored spec lacks a key (made by an older
    mlcloud) gets from the controller what the spec (and so the node agent) would give it."""
    spec = AutoscaleSpec()
    shared = set(Policy.__dataclass_fields__) & set(AutoscaleSpec.__dataclass_fields__)
    assert shared == set(Policy.__dataclass_fields__) - {"lost_after"}
    assert {k: getattr(Policy(), k) for k in shared} == {k: getattr(spec, k) for k in shared}
