"""How a job ended, from how it ended on each node: pure, shared by the driver (which saw the
nodes end) and by reconciliation (which reads the nodes afterwards)."""

from __future__ import annotations

from dataclasses import dataclass

from mlcloud import state

KILLED = 137  # node_ctl's code for "the job's processes were killed"
LOST = 255  # the driver's code for "the connection to the node dropped"


@dataclass(frozen=True)
class NodeEnd:
    code: int
    failure: dict | None = None  # node_ctl's failure.json: the first failing rank there
    cancelled: bool = False  # `mlcloud cancel` stopped it
    stopped: dict | None = None  # node_ctl's {"kind", "reason"}: a rule stopped it there


@dataclass(frozen=True)
class Outcome:
    status: str
    exit_code: int
    line: str  # the `[mlcloud]` line that ends the job's log
    # the rule that stopped it: stall, budget, idle, heartbeat (a node agent's), cancel, down
    stopped_by: str | None = None


# the node agent's stop kinds (templates/agent.py) as the rule's name a person knows
RULES = {
    "stall": "stall",
    "budget_stop": "budget",
    "idle_teardown": "idle",
    "heartbeat_lost": "heartbeat",
}


def describe(node: int, end: NodeEnd) -> str:
    """`node1 rank 3: exited with 5`, `node0: lost contact (...)`."""
    f, code = end.failure, end.code
    rank = f.get("rank") if f else None
    who = f"node{node}" + (f" rank {rank}" if rank is not None else "")
    if f and f.get("signal"):
        return f"{who}: killed by {f['signal']} (exit {code})"
    if code == LOST:
        return f"{who}: lost contact (the node or its connection went away)"
    if rank is None and code == KILLED:
        return f"{who}: its processes were killed (exit 137)"
    if rank is None and code > 128:
        return f"{who}: ended by signal {code - 128} (exit {code})"
    return f"{who}: exited with {code}"


def decide(job_id: int, ends: dict[int, NodeEnd], order: list[int]) -> Outcome:
    """The job's code is the first failing node's (in the order the nodes ended), which
    node_ctl made its first failing rank's own code."""
    failures = [i for i in order if ends[i].code != 0]
    code = ends[failures[0]].code if failures else 0
    details = "; ".join(describe(i, ends[i]) for i in failures)
    if any(e.cancelled for e in ends.values()):
        return Outcome(
            state.JOB_CANCELLED,
            code,
            f"job {job_id} cancelled" + (f": {details}" if details else ""),
            "cancel",
        )
    rule = next((ends[i].stopped for i in failures if ends[i].stopped), None)
    if rule is not None:
        name = RULES.get(rule["kind"], rule["kind"])
        why = f" ({rule['reason']})" if rule.get("reason") else ""
        return Outcome(
            state.JOB_FAILED, code, f"job {job_id} stopped by the {name} rule{why}: {details}", name
        )
    if failures:
        return Outcome(state.JOB_FAILED, code, f"job {job_id} failed: {details}")
    return Outcome(state.JOB_SUCCEEDED, 0, f"job {job_id} succeeded on {len(ends)} node(s)")
