"""fan_out: the first error comes back as itself (type and fields), and an interrupt reaches
the caller at once instead of after the slowest worker."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from mlcloud.providers.base import CapacityError, QuotaError

from mlcloud.parallel import fan_out


@pytest.mark.parametrize(
    "error", [CapacityError("us-east-1a", "no p4d"), QuotaError("us-east-1", "vCPU quota")]
)
def test_the_first_error_keeps_its_type_and_fields(error):
    message = str(error)

    def fn(i: int) -> int:
        if i == 0:
            time.sleep(0.1)  # fails last, still reported first: input order
            raise error
        if i == 1:
            raise type(error)("elsewhere", "other")
        return i

    with pytest.raises(type(error)) as e:
        fan_out(fn, [0, 1, 2])
    assert e.value is error
    assert str(e.value) == f"{message} (and 1 more node(s) failed)"
    assert getattr(e.value, "zone", getattr(e.value, "scope", None)) in ("us-east-1a", "us-east-1")


def test_results_in_input_order():
    assert fan_out(lambda i: i * i, list(range(40)), limit=3) == [i * i for i in range(40)]


INTERRUPTED = """
import signal, sys, time
from mlcloud.parallel import Cancelled, fan_out, pause
signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
stopped = []
def wait(i):
    try:
        pause(600)  # a node that never answers, as a new instance while it boots
    except Cancelled:
        stopped.append(i)
        raise
print("waiting", flush=True)
t0 = time.monotonic()
try:
    fan_out(wait, [0, 1, 2])
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - t0:.2f}", flush=True)
    time.sleep(0.5)
    print(f"workers stopped: {sorted(stopped)}", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_reaches_the_caller_within_2s_and_stops_the_workers(sig):
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "waiting\n"
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    took = float(out.split("interrupted after ")[1].split()[0])
    assert took < 0.5 + 2
    assert "workers stopped: [0, 1, 2]" in out
