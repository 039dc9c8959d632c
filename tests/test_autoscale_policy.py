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
        Policy(max_cost=12.0),  # 1 + 3 x 3.6 = 11.8
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
