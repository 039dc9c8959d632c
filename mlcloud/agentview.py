"""The engine's side of the node agent (templates/agent.py): the config it is given at
bootstrap, and typed readers of what it leaves under <root>/agent/ (samples, events, the
stop record), read over a node's Transport. Used by `status`, `events` and the controller."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass

from mlcloud.cost import Interval, accrued, hourly
from mlcloud.remote.layout import tag
from mlcloud.remote.transport import RemoteError, Transport
from mlcloud.spec import AutoscaleSpec

AGENT = "bin/agent.py"  # relative to a node's root, beside node_ctl.py
DIR = "agent"  # the agent's files, relative to a node's root
METADATA = {"aws": "http://169.254.169.254", "gce": "http://metadata.google.internal"}


def metadata_endpoints() -> dict[str, str]:
    """Where the agents ask their cloud's metadata server. MLCLOUD_METADATA_AWS/_GCE replace
    the real ones (a local stand-in: emulated clouds, whose nodes are not cloud machines)."""
    return {k: os.environ.get(f"MLCLOUD_METADATA_{k.upper()}", v) for k, v in METADATA.items()}


def deadline(max_cost: float | None, per_hour: float, start: float) -> float | None:
    """Unix time at which max_cost is spent at per_hour (the whole cluster's $/h); None when
    there is no budget or nothing is billed."""
    if max_cost is None or per_hour <= 0:
        return None
    return start + max_cost / per_hour * 3600


def budget_deadline(
    max_cost: float | None, billing: list[Interval], now: float, joining: float = 0.0
) -> float | None:
    """When what is left of max_cost is spent at the rate of the nodes billing now, plus
    `joining` $/h for nodes about to join; None when there is no budget or no rate."""
    if max_cost is None:
        return None
    return deadline(max(max_cost - accrued(billing, now), 0.0), hourly(billing) + joining, now)


def set_deadline(t: Transport, root: str, due: float | None) -> None:
    """Give a node's agent a new budget deadline (it re-reads config.json every poll).
    Raises RemoteError when the node cannot be asked or has no agent config."""
    path = f"{root}/{DIR}/config.json"
    raw = t.get(path)
    if raw is None:
        raise RemoteError(f"{t.label}: no agent config at {path}")
    conf = json.loads(raw)
    conf["deadline"] = due
    t.put(json.dumps(conf).encode(), path, mode=0o600)


def config(
    auto: AutoscaleSpec,
    provider: str,
    uid: str,
    node: int,
    node_id: str,
    spot: bool,
    due: float | None,
    owns_machines: bool = False,
    number: int | None = None,
) -> dict[str, object]:
    """config.json for one node's agent (it re-reads it every poll). node_id lets a cloud
    node's agent make sure the metadata server describes this very instance before it powers
    anything off; spot turns on the polling of preemption notices; owns_machines (the
    provider's capability) says whether stopping the node powers it off; number is the K of
    the node's `node-K` directory, which its processes are tagged by (default: node)."""
    return {
        "poll_seconds": auto.poll_seconds,
        "idle_minutes": auto.idle_minutes,
        "idle_util_percent": auto.idle_util_percent,
        "stall_minutes": auto.stall_minutes,
        "on_stall": auto.on_stall,
        "heartbeat_minutes": auto.heartbeat_minutes,
        "deadline": due,
        "provider": provider,
        "node": node,
        "tag": tag(uid, node if number is None else number),
        "metadata": metadata_endpoints(),
        "node_id": node_id,
        "spot": spot,
        "owns_machines": owns_machines,
    }


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
    """What one node's agent left: its stop record and events (and samples when asked)."""

    node: int
    stopped: Stopped | None
    events: tuple[Event, ...]
    samples: tuple[Sample, ...] = ()


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


def parse_sample(d: dict) -> Sample:
    job = d.get("job")
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
        job=JobSample(int(job["id"]), job["state"], job.get("step")) if job else None,
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


_SEP = "@mlcloud-agent-file"


def read(t: Transport, root: str, node: int, samples: int = 0, timeout: float = 10.0) -> NodeView:
    """One round trip: the node's stop record, its events and (samples > 0) its newest samples.
    Raises RemoteError when the node cannot be asked."""
    d = f"{root}/{DIR}"
    cmd = (
        f"cat {shlex.quote(d + '/stopped')} 2>/dev/null; echo {_SEP}; "
        f"cat {shlex.quote(d + '/events.jsonl')} 2>/dev/null; echo {_SEP}; "
        + (
            f"tail -n {int(samples)} {shlex.quote(d + '/samples.jsonl')} 2>/dev/null; "
            if samples
            else ""
        )
        + "true"
    )
    r = t.run(cmd, timeout=timeout)
    if r.exit_code != 0:
        raise RemoteError(f"{t.label}: reading the agent's files failed: {r.stderr.strip()[-200:]}")
    parts = (r.stdout.split(_SEP + "\n") + ["", "", ""])[:3]
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
    return NodeView(node, stopped, tuple(events), parse_samples(parts[2]))
