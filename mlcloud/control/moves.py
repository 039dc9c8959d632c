"""Move for price (pure): whether a running job should move to a cheaper offer.

A move pays for itself only if the cheaper placement saves more than the restart costs: the
time the new cluster takes to resume (measured) and the work since the last checkpoint (done
again) are paid at the current rate, and that cost is spread over what is left of the job
(one hour when nobody knows). The job moves when the best offer, with that spread added, is
cheaper than the current one by more than `savings` (recover.move_savings), and never on a
price that is not live and fresh (docs/architecture.md, "Live prices").
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcloud.spec.offers import Offer

UNKNOWN_REMAINING_S = 3600.0  # the restart's cost is spread over an hour when nobody knows


@dataclass(frozen=True)
class Move:
    go: bool
    reason: str  # one line for a person, with the dollars
    saving_per_hour: float  # USD/h for all the job's nodes once moved (negative: dearer)
    restart_cost: float  # USD, once: resuming plus the work since the last checkpoint


def decide_move(
    current: Offer,
    best: Offer,
    *,
    savings: float | None,
    resume_s: float,
    since_checkpoint_s: float,
    remaining_s: float | None,
    nodes: int,
    now: float,
    max_age: float,
) -> Move:
    """Go or stay, and why. savings: the least fraction of the current $/h the move must save
    after the restart's cost (None: moves are off)."""
    cur, new = current.price, best.price
    saving = (cur - new) * nodes if cur is not None and new is not None else 0.0
    restart = (max(resume_s, 0.0) + max(since_checkpoint_s, 0.0)) / 3600 * (cur or 0.0) * nodes

    def stay(reason: str) -> Move:
        return Move(False, reason, saving, restart)

    if savings is None:
        return stay("moves for price are off (recover.move_savings: off)")
    if (best.provider, best.region, best.zone, best.instance_type) == (
        current.provider,
        current.region,
        current.zone,
        current.instance_type,
    ):
        return stay(f"{current.place} is the cheapest offer")
    for name, offer in (("current", current), ("best", best)):
        if not offer.fresh(now, max_age):
            return stay(f"no move: the {name} price ({offer.place}) is {_age(offer, now)}")
    assert cur is not None and new is not None  # fresh() has a price
    if remaining_s is not None and remaining_s <= 0:
        return stay("no move: the job is about to end")
    spread_h = (UNKNOWN_REMAINING_S if remaining_s is None else remaining_s) / 3600
    net = saving - restart / spread_h
    share = net / (cur * nodes) if cur > 0 else 0.0
    what = (
        f"{best.place} at ${new * nodes:.2f}/h instead of ${cur * nodes:.2f}/h on "
        f"{current.place} saves ${saving:.2f}/h, ${net:.2f}/h ({share:.0%}) after the restart's "
        f"${restart:.2f} over {_hours(spread_h)}"
        + ("" if remaining_s is not None else " (remaining time unknown)")
    )
    if share > savings:
        return Move(True, f"move: {what}, more than {savings:.0%}", saving, restart)
    return stay(f"no move: {what}, not more than {savings:.0%}")


def _age(offer: Offer, now: float) -> str:
    if offer.price is None:
        return "unknown"
    if offer.at is None:
        return "the catalog's, not live"
    if offer.at > now:
        return "stamped later than now (a clock behind the one that read it)"
    return f"stale (read {_hours((now - offer.at) / 3600)} ago)"


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.0f} min"
