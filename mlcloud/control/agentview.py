"""The engine's side of the node agent (templates/agent.py): the config it is given at
bootstrap, and typed readers of what it leaves under <root>/agent/ (samples, events, the
stop record), read over a node's Transport. Used by `status`, `events` and the controller."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from mlcloud.remote.shell import DIR, path_arg, quote
from mlcloud.remote.transport import RemoteError, SilentError, Transport


@dataclass(frozen=True)
class GpuSample:
    index: int
    util: float | None
    mem_used: float | None
    mem_total: float | None
    power: float | None


@dataclass(frozen=True)
class JobSample:
    id: int
    state: str
    step: int | None
    progress: float | None = None  # fraction done 0..1, from MLCLOUD_PROGRESS_FILE; None: unsaid


@dataclass(frozen=True)
class Sample:
    time: float
    gpus: tuple[GpuSample, ...]
    cpu_percent: float
    mem_used_mb: int
    mem_total_mb: int
    job: JobSample | None
    verdict: str  # idle | busy | stalled | starting


@dataclass(frozen=True)
class Event:
    time: float  # unix
    kind: str
    node: int | None
    message: str


@dataclass(frozen=True)
class Stopped:
    """The dead-man switch fired on this node: when, which rule (kind), and why."""

    time: float
    kind: str
    reason: str


@dataclass(frozen=True)
class NodeView:
    """What one node's agent left: its stop record and events."""

    node: int
    stopped: Stopped | None
    events: tuple[Event, ...]


def _lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            d = json.loads(line)
        except ValueError:  # a line being appended as we read
            continue
        if isinstance(d, dict):
            out.append(d)
    return out


def _fraction(value: object) -> float | None:
    """A progress fraction as the agent writes it (0..1), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None  # NaN fails both


def parse_sample(d: dict) -> Sample:
    j = d.get("job")
    job = (
        JobSample(int(j["id"]), j["state"], j.get("step"), _fraction(j.get("progress")))
        if j
        else None
    )
    return Sample(
        time=float(d["time"]),
        gpus=tuple(
            GpuSample(
                g["index"], g.get("util"), g.get("mem_used"), g.get("mem_total"), g.get("power")
            )
            for g in d.get("gpus") or []
        ),
        cpu_percent=float(d.get("cpu_percent") or 0.0),
        mem_used_mb=int(d.get("mem_used_mb") or 0),
        mem_total_mb=int(d.get("mem_total_mb") or 0),
        job=job,
        verdict=d.get("verdict", "busy"),
    )


def parse_event(d: dict) -> Event:
    node = d.get("node")
    return Event(
        float(d["time"]), str(d["kind"]), None if node is None else int(node), str(d["message"])
    )


def parse_samples(text: str) -> tuple[Sample, ...]:
    """The samples in (a tail of) samples.jsonl, oldest first; a line cut short by a write
    under way, or one that is not a sample, is skipped."""
    rows = []
    for x in _lines(text):
        try:
            rows.append(parse_sample(x))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return tuple(rows)


def since(rows: tuple[Sample, ...], verdict: str) -> float | None:
    """Start of the unbroken run of `verdict` that the newest sample ends, or None."""
    start = None
    for s in reversed(rows):
        if s.verdict != verdict:
            break
        start = s.time
    return start


MIN_SPAN_S = 60.0  # the least time a progress estimate is measured over


def remaining(rows: tuple[Sample, ...], job_id: int) -> float | None:
    """Seconds job `job_id` still needs by its progress on one node, as of the newest sample:
    rate = Δfraction / Δtime from the first to the newest of its samples that carry a fraction
    (since the fraction last fell: a restart resumed from an earlier checkpoint), remaining =
    (1 - fraction) / rate; 0 once it reads done. None with no progress signal, no advance, or
    under MIN_SPAN_S of it (a rate from two close samples says little). Pure: the samples'
    times (one node's clock) are the clock."""
    points = [
        (s.time, s.job.progress)
        for s in rows
        if s.job is not None and s.job.id == job_id and s.job.progress is not None
    ]
    for k in range(len(points) - 1, 0, -1):
        if points[k][1] < points[k - 1][1]:
            points = points[k:]
            break
    if not points:
        return None
    (t0, f0), (t1, f1) = points[0], points[-1]
    if f1 >= 1.0:
        return 0.0
    if f1 <= f0 or t1 - t0 < MIN_SPAN_S:
        return None
    return (1.0 - f1) * (t1 - t0) / (f1 - f0)


def job_remaining(per_node: list[tuple[Sample, ...]], job_id: int) -> float | None:
    """The job's remaining seconds from every node's samples: the longest of the nodes'
    estimates (the job ends with its slowest node; a node whose job says nothing, or one
    written only on the head, leaves the estimate to the others); None when no node has one.
    Each node is estimated on its own, so nodes' clocks never meet."""
    found = [r for rows in per_node if (r := remaining(rows, job_id)) is not None]
    return max(found, default=None)


_SEP = "@mlcloud-agent-file"
EVENTS_READ = 64 * 1024  # bytes of a node's events.jsonl read per pass (its tail)


def read(t: Transport, root: str, node: int, timeout: float = 10.0) -> NodeView:
    """One round trip: the node's stop record and its newest events, EVENTS_READ bytes at
    most (each is merged once, so a pass needs only what came since the last; a first line
    cut by the byte count does not parse and is left out). Samples are the probe's. Raises
    RemoteError when the node cannot be asked."""
    d = f"{root}/{DIR}"
    cmd = (
        f"cat {quote(d + '/stopped')} 2>/dev/null; echo {_SEP}; "
        f"tail -c {EVENTS_READ} {quote(d + '/events.jsonl')} 2>/dev/null; true"
    )
    r = t.run(cmd, timeout=timeout)
    if r.exit_code != 0:
        raise RemoteError(f"{t.label}: reading the agent's files failed: {r.stderr.strip()[-200:]}")
    parts = (r.stdout.split(_SEP + "\n") + ["", ""])[:2]
    stopped = None
    s = _lines(parts[0])
    if s and "time" in s[0]:
        stopped = Stopped(
            float(s[0]["time"]), str(s[0].get("kind", "")), str(s[0].get("reason", ""))
        )
    events = []
    for e in _lines(parts[1]):
        try:
            events.append(parse_event(e))
        except (KeyError, TypeError, ValueError):
            continue
    return NodeView(node, stopped, tuple(events))


MARK = "@mlcloud:probe"
WINDOW = 120  # samples read per pass: at the default 5 s poll, the last 10 minutes
# A probe slower than this counts as one miss (two in a row: lost). A node that went silent is
# not left to this: its connection's heartbeat gives it up (SilentError), and then it is lost.
TIMEOUT = 4.0


@dataclass(frozen=True)
class Probe:
    reachable: bool
    samples: tuple[Sample, ...] = ()
    error: str | None = None
    silent_s: float | None = None  # the connection heard nothing, asked, for this long


def _command(root: str, now: float, lines: int) -> str:
    # Only where the agent's directory is: a node whose directory was removed (terminated,
    # cleaned up) must not be made again by a probe, or the provider would list it as alive.
    agent = f"{path_arg(root)}/{DIR}"
    return (
        f"if [ -d {agent} ]; then echo {now:.0f} > {agent}/.heartbeat.tmp "
        f"&& mv -f {agent}/.heartbeat.tmp {agent}/heartbeat; fi; echo {MARK} "
        f"&& tail -n {lines:d} {agent}/samples.jsonl 2>/dev/null; true"
    )


def probe(
    t: Transport, root: str, now: float, timeout: float = TIMEOUT, lines: int = WINDOW
) -> Probe:
    """One round trip: the heartbeat written, the newest `lines` samples read."""
    try:
        result = t.run(_command(root, now, lines), timeout=timeout)
    except SilentError as e:  # the transport's heartbeat timed the silence: no second look
        return Probe(False, error=str(e), silent_s=e.seconds)
    except Exception as e:  # noqa: BLE001 (any failure to answer is what is measured)
        return Probe(False, error=str(e) or type(e).__name__)
    lines = result.stdout.splitlines()
    if MARK not in lines:
        return Probe(False, error=(result.stderr.strip() or "no answer")[:200])
    return Probe(True, parse_samples("\n".join(lines[lines.index(MARK) + 1 :])))


class Window:
    """The samples a long-lived controller holds per node, so a pass reads only what came
    since the last (a few lines, not WINDOW: the probe is the heartbeat, and its cost is per
    node per pass). `lines(node, now)` says how many to read; `merge` joins what was read. A
    read that may have left a gap (none of it overlaps what is held) is kept alone, and the
    next read is a whole window: a sample missed in a gap could hide the end of an idle run."""

    def __init__(self, every: float):
        self.every = every  # the agent's sampling period (its poll_seconds)
        self.held: dict[str, tuple[Sample, ...]] = {}
        self.read_at: dict[str, float] = {}  # monotonic

    def lines(self, node: str, now: float) -> int:
        if node not in self.held or node not in self.read_at:
            return WINDOW
        return min(WINDOW, math.ceil((now - self.read_at[node]) / self.every) + 2)

    def merge(self, node: str, now: float, asked: int, read: tuple[Sample, ...]) -> None:
        held = self.held.get(node)
        if held is None or asked >= WINDOW:
            self.held[node], self.read_at[node] = read, now
            return
        if held and read and len(read) >= asked and read[0].time > held[-1].time:
            self.held[node] = read  # a gap may lie between: a whole window next pass
            self.read_at.pop(node, None)
            return
        newest = held[-1].time if held else -math.inf
        self.held[node] = (held + tuple(x for x in read if x.time > newest))[-WINDOW:]
        self.read_at[node] = now

    def forget(self, keep: set[str]) -> None:
        for d in (self.held, self.read_at):
            for node in set(d) - keep:
                del d[node]


def detach(t: Transport, root: str) -> None:
    """Remove the heartbeat: a controller that ends cleanly disarms the agent's lost-heartbeat
    rule instead of leaving it to fire."""
    try:
        t.run(f"rm -f {path_arg(root)}/{DIR}/heartbeat", timeout=TIMEOUT)
    except Exception:  # noqa: BLE001 (an unreachable node has no heartbeat to keep anyway)
        pass
