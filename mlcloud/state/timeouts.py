"""Waits the environment may change: MLCLOUD_<NAME>=SECONDS replaces a default. A slow link
wants longer ones; the test suite runs the same code at a test's pace with shorter ones.

Each is read where it is used, so a change applies to the next use. `check()` refuses a bad
value up front (the CLI calls it before any command), in one line naming the variable."""

from __future__ import annotations

import os

from mlcloud import numbers
from mlcloud.errors import UsageError

# name -> (default seconds, what it is)
DEFAULTS = {
    "SSH_HEARTBEAT_EVERY": (
        2.0,
        "how long an SSH connection may hear nothing before a heartbeat asks the node",
    ),
    "SSH_HEARTBEAT_TIMEOUT": (
        8.0,
        "how long an SSH connection may hear nothing, asked, before the node counts as lost",
    ),
    "FAIL_GRACE": (15.0, "how long the other nodes may run on once one node's job failed"),
    "DB_BUSY_TIMEOUT": (10.0, "how long to wait for a state database another process holds"),
    "MOVE_CHECK_EVERY": (
        300.0,
        "how often a managed job's watcher asks for live offers to decide a move for price",
    ),
    "MOVE_PRICE_MAX_AGE": (
        900.0,
        "how old a live price may be and still drive a move for price (asked again at half)",
    ),
    "MOVE_CHECKPOINT_WAIT": (
        600.0,
        "how long a move for price waits for a fresh checkpoint before deciding again",
    ),
    "DB_CONNECT_TIMEOUT": (5.0, "how long to wait for a shared state database to answer a connect"),
}


def seconds(name: str) -> float:
    """MLCLOUD_<name> if set (a positive number of seconds), else its default."""
    default, what = DEFAULTS[name]
    raw = os.environ.get(f"MLCLOUD_{name}", "").strip()
    if not raw:
        return default
    try:
        return float(numbers.check(float(raw), 0, numbers.YEAR_S, above=True))
    except ValueError:  # numbers.Invalid among them
        raise UsageError(
            f"MLCLOUD_{name}={numbers.short(raw)}: expected a positive number of seconds, "
            f"{what} (default {default:g}); fix or unset it"
        ) from None


def check() -> None:
    """Refuse a bad value of any of them now rather than mid-command."""
    for name in DEFAULTS:
        seconds(name)
