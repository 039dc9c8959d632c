"""One round trip per node and pass: write the controller's heartbeat where the node agent
looks for it, and read the agent's newest samples back (the node-side contract of
`<root>/agent/`, read by mlcloud.agentview). A node that does not answer in time counts as
unreachable this pass."""

from __future__ import annotations

from dataclasses import dataclass

from mlcloud import agentview
from mlcloud.remote.shell import path_arg
from mlcloud.remote.transport import Transport

MARK = "@mlcloud:probe"
WINDOW = 120  # samples read per pass: at the default 5 s poll, the last 10 minutes
TIMEOUT = 4.0  # an answer slower than this is no answer: detection stays within 15 s


@dataclass(frozen=True)
class Probe:
    reachable: bool
    samples: tuple[agentview.Sample, ...] = ()
    error: str | None = None


def _command(root: str, now: float) -> str:
    # Only where the agent's directory is: a node whose directory was removed (terminated,
    # cleaned up) must not be made again by a probe, or the provider would list it as alive.
    agent = f"{path_arg(root)}/{agentview.DIR}"
    return (
        f"if [ -d {agent} ]; then echo {now:.0f} > {agent}/.heartbeat.tmp "
        f"&& mv -f {agent}/.heartbeat.tmp {agent}/heartbeat; fi; echo {MARK} "
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
    return Probe(True, agentview.parse_samples("\n".join(lines[lines.index(MARK) + 1 :])))


def detach(t: Transport, root: str) -> None:
    """Remove the heartbeat: a controller that ends cleanly disarms the agent's lost-heartbeat
    rule instead of leaving it to fire."""
    try:
        t.run(f"rm -f {path_arg(root)}/{agentview.DIR}/heartbeat", timeout=TIMEOUT)
    except Exception:  # noqa: BLE001 (an unreachable node has no heartbeat to keep anyway)
        pass
