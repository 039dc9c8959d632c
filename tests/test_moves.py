"""Move for price (mlcloud/control/moves.py), pure: the rule's figures on a fake clock, its
refusals (off, stale or catalog prices, the job's end), and properties that hold for any
prices (hypothesis): a cheaper best never turns a go into a stay, and so on."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcloud.control.moves import decide_move
from mlcloud.spec.offers import CACHED, CATALOG, LIVE, Offer

NOW = 1_800_000_000.0
MAX_AGE = 600.0
CURRENT = Offer("aws", "us-east-1", "us-east-1a", "p4d.24xlarge", True, 10.0, NOW - 60, CACHED)
CHEAP = Offer("gce", "europe-west4", None, "a2-highgpu-8g", True, 5.0, NOW, LIVE)


def decide(current=CURRENT, best=CHEAP, **kw):
    args = dict(
        savings=0.3,
        resume_s=120.0,
        since_checkpoint_s=300.0,
        remaining_s=7200.0,
        nodes=2,
        now=NOW,
        max_age=MAX_AGE,
    )
    return decide_move(current, best, **{**args, **kw})


def test_half_the_price_moves_and_says_the_dollars():
    m = decide()
    assert m.go
    assert m.saving_per_hour == pytest.approx(10.0)  # (10 - 5) x 2 nodes
    assert m.restart_cost == pytest.approx(420 / 3600 * 10 * 2)  # (resume + since) at $20/h
    assert m.reason == (
        "move: gce:europe-west4 at $10.00/h instead of $20.00/h on aws:us-east-1a saves "
        "$10.00/h, $8.83/h (44%) after the restart's $2.33 over 2.0 h, more than 30%"
    )


def test_the_restart_is_what_a_small_saving_cannot_pay_for():
    near = replace(CHEAP, price=6.5)  # 35% cheaper before the restart, 29% after it
    m = decide(best=near)
    assert not m.go and m.reason.startswith("no move:") and "not more than 30%" in m.reason
    assert decide(best=near, resume_s=0, since_checkpoint_s=0).go  # a free restart: 35% > 30%


def test_the_restart_is_spread_over_the_remaining_time_else_an_hour():
    short = decide(remaining_s=600)  # $2.33 over 10 min: $14/h of restart, more than saved
    assert not short.go and "over 10 min" in short.reason
    unknown = decide(remaining_s=None)
    assert unknown.go and "over 1.0 h (remaining time unknown)" in unknown.reason
    assert not decide(remaining_s=0).go
    assert decide(remaining_s=0).reason == "no move: the job is about to end"


def test_off_stale_and_catalog_prices_never_move():
    assert decide(savings=None).reason == "moves for price are off (recover.move_savings: off)"
    stale = decide(best=replace(CHEAP, at=NOW - MAX_AGE - 1, source=CACHED))
    assert not stale.go
    assert stale.reason == "no move: the best price (gce:europe-west4) is stale (read 10 min ago)"
    catalog = decide(current=replace(CURRENT, at=None, source=CATALOG))
    assert not catalog.go
    assert catalog.reason == (
        "no move: the current price (aws:us-east-1a) is the catalog's, not live"
    )
    unknown = decide(best=replace(CHEAP, price=None, at=None, source=CATALOG))
    assert not unknown.go and unknown.reason.endswith("is unknown")
    future = decide(best=replace(CHEAP, at=NOW + 5))  # a clock behind the cache's is no help
    assert not future.go and "stamped later than now" in future.reason


def test_the_same_place_is_no_move():
    m = decide(best=replace(CURRENT, price=1.0))
    assert not m.go and m.reason == "aws:us-east-1a is the cheapest offer"


def test_a_dearer_best_stays_with_a_negative_saving():
    m = decide(best=replace(CHEAP, price=12.0))
    assert not m.go and m.saving_per_hour == pytest.approx(-4.0)


# -- properties -----------------------------------------------------------------------------

prices = st.floats(min_value=0.01, max_value=100.0, allow_nan=False)
seconds = st.floats(min_value=0.0, max_value=86400.0, allow_nan=False)
remaining = st.one_of(st.none(), st.floats(min_value=1.0, max_value=1e6, allow_nan=False))
shares = st.floats(min_value=0.0, max_value=0.95, allow_nan=False)
case = st.fixed_dictionaries(
    {
        "cur": prices,
        "new": prices,
        "savings": shares,
        "resume_s": seconds,
        "since_checkpoint_s": seconds,
        "remaining_s": remaining,
        "nodes": st.integers(min_value=1, max_value=64),
    }
)


def run(c: dict, **over):
    c = {**c, **over}
    return decide(
        current=replace(CURRENT, price=c["cur"]),
        best=replace(CHEAP, price=c["new"]),
        savings=c["savings"],
        resume_s=c["resume_s"],
        since_checkpoint_s=c["since_checkpoint_s"],
        remaining_s=c["remaining_s"],
        nodes=c["nodes"],
    ).go


@settings(max_examples=300, deadline=None)
@given(case, st.floats(min_value=0.0, max_value=1.0))
def test_a_cheaper_best_never_turns_a_go_into_a_stay(c, cut):
    if run(c):
        assert run(c, new=c["new"] * (1 - cut))


@settings(max_examples=300, deadline=None)
@given(case, shares)
def test_a_higher_bar_never_turns_a_stay_into_a_go(c, bar):
    if not run(c) and bar >= c["savings"]:
        assert not run(c, savings=bar)


@settings(max_examples=300, deadline=None)
@given(case, seconds, seconds)
def test_a_dearer_restart_never_turns_a_stay_into_a_go(c, more_resume, more_work):
    if not run(c):
        assert not run(
            c,
            resume_s=c["resume_s"] + more_resume,
            since_checkpoint_s=c["since_checkpoint_s"] + more_work,
        )


@settings(max_examples=300, deadline=None)
@given(case, st.floats(min_value=1.0, max_value=1e6))
def test_a_longer_remaining_time_never_turns_a_go_into_a_stay(c, more):
    if run(c) and c["remaining_s"] is not None:
        assert run(c, remaining_s=c["remaining_s"] + more)


@settings(max_examples=300, deadline=None)
@given(case)
def test_a_move_always_saves_more_than_the_bar_and_never_when_dearer(c):
    if run(c):
        assert c["new"] < c["cur"] * (1 - c["savings"])
    if c["new"] >= c["cur"]:
        assert not run(c)
