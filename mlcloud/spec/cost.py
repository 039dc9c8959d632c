"""Money: what a cluster costs per hour and what it has cost, from billable intervals.

Pure functions over intervals (a node's price from the time it was up to the time it was
confirmed gone, or still open), so they test with a fake clock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class Interval:
    cluster: str
    uid: str
    provider: str
    node_id: str
    instance_type: str
    region: str
    price: float  # USD per hour
    start: float
    end: float | None  # None: still billing


def accrued(intervals: list[Interval], now: float) -> float:
    return sum(i.price * max(0.0, (min(i.end or now, now) - i.start)) / 3600 for i in intervals)


def hourly(intervals: list[Interval]) -> float:
    """The burn rate now: the price of every node still billing."""
    return sum(i.price for i in intervals if i.end is None)


def _month_start(t: float) -> float:
    d = datetime.fromtimestamp(t, timezone.utc)
    return datetime(d.year, d.month, 1, tzinfo=timezone.utc).timestamp()


def _next_month(t: float) -> float:
    d = datetime.fromtimestamp(t, timezone.utc)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return datetime(year, month, 1, tzinfo=timezone.utc).timestamp()


def by_month(intervals: list[Interval], now: float) -> dict[tuple[str, str], float]:
    """(provider, 'YYYY-MM') -> USD, an interval split at month boundaries (UTC)."""
    out: dict[tuple[str, str], float] = {}
    for i in intervals:
        t, end = i.start, min(i.end or now, now)
        while t < end:
            cut = min(end, _next_month(t))
            key = (
                i.provider,
                datetime.fromtimestamp(_month_start(t), timezone.utc).strftime("%Y-%m"),
            )
            out[key] = out.get(key, 0.0) + i.price * (cut - t) / 3600
            t = cut
    return out
