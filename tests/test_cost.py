"""Accrued cost from billable intervals, with a fake clock: stop/start, month boundaries."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from mlcloud.spec.cost import Interval, accrued, by_month, hourly

H = 3600.0


def t(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def node(start, end, price=10.0, provider="aws", node_id="i-1"):
    return Interval("c", "c-1", provider, node_id, "p4d.24xlarge", "us-east-1", price, start, end)


def test_running_node_accrues_with_the_clock():
    start = t("2026-11-27T10:00:00")
    iv = [node(start, None)]
    assert accrued(iv, start + 1.5 * H) == pytest.approx(15.0)
    assert accrued(iv, start + 3 * H) == pytest.approx(30.0)
    assert hourly(iv) == 10.0


def test_stopped_interval_stops_accruing_and_a_restart_resumes():
    start = t("2026-11-27T10:00:00")
    iv = [node(start, start + 2 * H), node(start + 5 * H, None)]  # stopped 3 h, then started
    assert accrued(iv, start + 4 * H) == pytest.approx(20.0)  # nothing while stopped
    assert accrued(iv, start + 6 * H) == pytest.approx(30.0)
    assert hourly(iv) == 10.0
    assert hourly(iv[:1]) == 0.0


def test_months_split_at_the_boundary():
    iv = [
        node(t("2026-11-30T22:00:00"), t("2026-12-01T03:00:00"), price=2.0),
        node(t("2026-12-02T00:00:00"), None, price=1.0, provider="gcp", node_id="g-1"),
    ]
    months = by_month(iv, t("2026-12-02T10:00:00"))
    assert months[("aws", "2026-11")] == pytest.approx(4.0)
    assert months[("aws", "2026-12")] == pytest.approx(6.0)
    assert months[("gcp", "2026-12")] == pytest.approx(10.0)


def test_future_start_and_clock_before_end_are_safe():
    start = t("2026-11-27T10:00:00")
    assert accrued([node(start, start + H)], start - H) == 0.0
    assert accrued([node(start, start + 2 * H)], start + H) == pytest.approx(10.0)
