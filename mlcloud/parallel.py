"""Fan work out across nodes with bounded concurrency; failures are collected, not swallowed.

An interrupt (Ctrl-C, or SIGTERM turned into one) reaches the caller at once: the workers are
daemon threads, told to stop through `pause`/`cancelled`, and nobody waits for them, so the
caller's rollback starts within moments instead of after the slowest node.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from mlcloud.errors import MlcloudError

T = TypeVar("T")
R = TypeVar("R")

MAX_PARALLEL = 32

_worker = threading.local()  # .cancel: the Event of the fan_out this thread works for


class Cancelled(Exception):
    """The fan_out this thread works for was interrupted; stop and unwind."""


def cancelled() -> bool:
    """True in a worker whose fan_out was interrupted (always False outside one)."""
    event = getattr(_worker, "cancel", None)
    return event is not None and event.is_set()


def pause(seconds: float) -> None:
    """Sleep; in a worker, wake and raise Cancelled as soon as its fan_out is interrupted."""
    event: threading.Event | None = getattr(_worker, "cancel", None)
    if event is None:
        threading.Event().wait(seconds)
    elif event.wait(seconds):
        raise Cancelled()


def fan_out(fn: Callable[[T], R], items: Sequence[T], limit: int = MAX_PARALLEL) -> list[R]:
    """Run fn on every item in parallel; results in input order.

    If calls raised, the first one's error (in input order) is raised, unchanged in type and
    fields, once all calls have finished; its message counts the others that failed."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    cancel = threading.Event()
    results: list = [None] * len(items)
    errors: list[BaseException | None] = [None] * len(items)
    todo = iter(range(len(items)))
    take = threading.Lock()

    def work() -> None:
        _worker.cancel = cancel
        while not cancel.is_set():
            with take:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # noqa: BLE001 (handed to the caller below)
                errors[i] = e

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(limit, len(items)))]
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join()
    except BaseException:
        cancel.set()  # the workers stop at their next pause; nobody waits for them
        raise
    failed = [e for e in errors if e is not None]
    if failed:
        first = failed[0]
        if len(failed) > 1 and isinstance(first, MlcloudError) and len(first.args) == 1:
            first.args = (f"{first} (and {len(failed) - 1} more node(s) failed)",)
        raise first
    return results
