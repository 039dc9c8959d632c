"""Fan work out across nodes with bounded concurrency; failures are collected, not swallowed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from mlcloud.errors import MlcloudError

T = TypeVar("T")
R = TypeVar("R")

MAX_PARALLEL = 32


def fan_out(fn: Callable[[T], R], items: Sequence[T], limit: int = MAX_PARALLEL) -> list[R]:
    """Run fn on every item in parallel; results in input order.

    If any call raised, the first error is raised once all calls have finished, naming how
    many others failed, so that no thread is left running behind the caller's back."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(limit, len(items))) as pool:
        futures = [pool.submit(fn, i) for i in items]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        first = failed[0]
        if len(failed) > 1 and isinstance(first, MlcloudError):
            raise type(first)(f"{first} (and {len(failed) - 1} more node(s) failed)") from first
        raise first
    return [f.result() for f in futures]
