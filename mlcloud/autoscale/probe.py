"""One round trip per node and pass: write the controller's heartbeat where the node agent
looks for it, and read the agent's newest samples back (the node-side contract of
`<root>/agent/`). A node that does not answer in time counts as unreachable this pass."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mlcloud.remote.shell import path_arg
from mlcloud.remote.transport import Transport

MARK = "@mlcloud:probe"
WINDOW = 120  # samples read per pass: at the default 5 s poll, the last 10 minutes
TIMEOUT = 4.0  # an answer slower than this is no answer: detection stays within 15 s


@dataclass(frozen=True)
class Sample:
    """The parts of an agent sample the controller decides on."""

    time: float
    verdict: str | None
    job_state: str | None
    step: int | None


@dataclass(frozen=True)
class Probe:
    reachable: bool
    samples: tuple[Sample, ...] = ()
    error: str | None = None


def _command(root: str, now: float) -> str:
    agent = f"{path_arg(root)}/agent"
    return (
        f"mkdir -p {agent} && echo {now:.0f} > {agent}/.heartbeat.tmp "
        f"&& mv -f {agent}/.heartbeat.tmp {agent}/heartbeat && echo {MARK} "
        f"&& tail -n {WINDOW} {agent}/samples.jsonl 2>/dev/null; true"
    )


def probe(t: Transport, root: str, now: float, timeout: float = TIMEOUT) -> Probe:
    try:
        result = t.run(_command(root, now), timeout=timeout)
    except Exception as e:  # noqa: BLE001 (any failure to answer is what is measured)
        return Probe(False, error=str(e) or type(e).__name__)
    lines = result.stdout.splitlines()
    if MARK not in lines:
        return Probe(False, error=(result.stderr.strip() or "no answer")[:200])
    return Probe(True, tuple(parse_samples(lines[lines.index(MARK) + 1 :])))


def parse_samples(lines: list[str]) -> list[Sample]:
    """Agent samples, oldest first; a line cut short by a concurrent write is skipped."""
    out = []
    for line in lines:
        try:
            d = json.loads(line)
            job = d.get("job") or {}
            out.append(
                Sample(float(d["time"]), d.get("verdict"), job.get("state"), job.get("step"))
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def since(samples: tuple[Sample, ...], verdict: str) -> float | None:
    """Start of the unbroken run of `verdict` that the newest sample ends, or None."""
    start = None
    for s in reversed(samples):
        if s.verdict != verdict:
            break
        start = s.time
    return start


def detach(t: Transport, root: str) -> None:
    """Remove the heartbeat: a controller that ends cleanly disarms the agent's lost-heartbeat
    rule instead of leaving it to fire."""
    try:
        t.run(f"rm -f {path_arg(root)}/agent/heartbeat", timeout=TIMEOUT)
    except Exception:  # noqa: BLE001 (an unreachable node has no heartbeat to keep anyway)
        pass
