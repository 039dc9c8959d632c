"""Follow a running job on every node: stream node-prefixed output to the terminal and the job's
log file, survive one node's hang, record how the job ended.

The job itself runs detached on the nodes, so this driver can run in the foreground (`train`)
or in a background process (`train --detach`); losing it does not lose the job.
"""

from __future__ import annotations

import shlex
import sys
import threading
import time
from collections.abc import Callable

from mlcloud import launch, state
from mlcloud.cluster import Handle
from mlcloud.errors import MlcloudError

# After one node fails, the others get this long to fail on their own before being killed;
# torchrun can otherwise sit 300 s in its exit barrier (FACTS.md).
FAIL_GRACE = 15.0
# After one node succeeds, the others get this long to finish.
DONE_GRACE = 60.0
# After stopping the rest, how long to wait for them to report before calling them lost.
STOP_WAIT = 30.0
KILLED = 137  # node_ctl's code for "the job's processes were killed"
LOST = 255  # the driver's code for "the connection to the node dropped"

Sink = Callable[[str], None]


def describe(code: int) -> str:
    if code == LOST:
        return "lost contact (the node or its connection went away)"
    if code == KILLED:
        return "its processes were killed (exit 137)"
    if code > 128:
        return f"ended by signal {code - 128} (exit {code})"
    return f"exited with {code}"


class Driver:
    def __init__(self, store: state.Store, h: Handle, job: state.JobRecord, sink: Sink):
        self.store, self.h, self.job, self.sink = store, h, job, sink
        self.codes: dict[int, int] = {}
        self.order: list[int] = []
        self.cond = threading.Condition()
        self.log = open(job.log_path, "a", buffering=1)  # noqa: SIM115 (closed in run)
        self.write_lock = threading.Lock()

    def emit(self, node: int, line: str) -> None:
        text = f"[node{node}] {line}"
        with self.write_lock:
            self.log.write(text + "\n")
            self.sink(text)

    def note(self, line: str) -> None:
        text = f"[mlcloud] {line}"
        with self.write_lock:
            self.log.write(text + "\n")
            self.sink(text)

    def _follow(self, i: int) -> None:
        t = self.h.transports[i]
        jd = launch.job_dir(self.h.nodes[i].root, self.job.job_id)
        try:
            result = t.run(
                f"{self.h.ctl(i)} follow {shlex.quote(jd)}", on_line=lambda line: self.emit(i, line)
            )
            code = result.exit_code
            if code == KILLED and result.stderr.strip():
                self.emit(i, result.stderr.strip().splitlines()[-1])
        except Exception as e:  # an unreachable node is a failed node, not a crashed driver
            self.emit(i, f"lost contact: {e}")
            code = LOST
        with self.cond:
            self.codes[i] = code
            self.order.append(i)
            self.cond.notify_all()

    def run(self) -> int:
        """Follow to the end; returns the job's exit code (first failure wins, else 0)."""
        n = len(self.h.nodes)
        threads = [threading.Thread(target=self._follow, args=(i,), daemon=True) for i in range(n)]
        for th in threads:
            th.start()
        try:
            self._wait_all(n)
        except KeyboardInterrupt:
            self.note("interrupted: stopping the job on every node (it checkpoints on SIGTERM)")
            self._stop_all(grace=10.0)
            for th in threads:
                th.join(timeout=30)
            self._finish(state.JOB_CANCELLED, 130)
            raise
        failures = [i for i in self.order if self.codes[i] != 0]
        code = self.codes[failures[0]] if failures else 0
        if failures:
            first = failures[0]
            self.note(
                f"job {self.job.job_id} failed: node{first}: {describe(code)}"
                + "".join(f"; node{i}: {describe(self.codes[i])}" for i in failures[1:])
            )
        else:
            self.note(f"job {self.job.job_id} succeeded on {n} node(s)")
        self._finish(state.JOB_FAILED if failures else state.JOB_SUCCEEDED, code)
        return code

    def _wait_all(self, n: int) -> None:
        """Wait for every node; once one has ended, the others get a grace period, then are
        stopped, then get a last short wait: a node that neither ends nor answers is LOST."""
        deadline = None
        stopped_at = None
        with self.cond:
            while len(self.codes) < n:
                now = time.monotonic()
                if self.codes and deadline is None:
                    grace = FAIL_GRACE if any(self.codes.values()) else DONE_GRACE
                    deadline = now + grace
                pending = [i for i in range(n) if i not in self.codes]
                if stopped_at is not None and now >= stopped_at + STOP_WAIT:
                    for i in pending:
                        self.emit(i, "did not end after being stopped; giving up on this node")
                        self.codes[i] = LOST
                        self.order.append(i)
                    return
                if deadline is not None and now >= deadline and stopped_at is None:
                    self.note(
                        f"node(s) {', '.join(f'node{i}' for i in pending)} still running "
                        f"after node{self.order[0]} ended; stopping them"
                    )
                    self.cond.release()
                    try:
                        self._stop(pending, grace=5.0)
                    finally:
                        self.cond.acquire()
                    stopped_at = time.monotonic()
                    continue
                self.cond.wait(timeout=0.5)

    def _stop(self, nodes: list[int], grace: float) -> None:
        """Stop the job on these nodes; one that cannot be reached is reported, not raised."""
        from mlcloud.parallel import fan_out

        def one(i: int) -> None:
            try:
                launch.kill(self.h, i, self.job.job_id, grace)
            except MlcloudError as e:
                self.emit(i, f"could not stop the job there: {e}")

        fan_out(one, nodes)

    def _stop_all(self, grace: float) -> None:
        self._stop([i for i in range(len(self.h.nodes)) if i not in self.codes], grace)

    def _finish(self, status: str, code: int) -> None:
        self.store.update_job(
            self.h.record.name,
            self.job.uid,
            self.job.job_id,
            status=status,
            exit_code=code,
            ended=time.time(),
        )
        self.store.event(self.h.record.name, "job", f"job {self.job.job_id} {status} ({code})")
        self.log.close()


def main(argv: list[str]) -> int:
    """Background driver for `train --detach`: python -m mlcloud.driver CLUSTER JOB [--down]."""
    from mlcloud import cluster
    from mlcloud.report import PlainReporter

    name, job_id, down_after = argv[0], int(argv[1]), "--down" in argv
    store = state.open_store()
    h = cluster.open_cluster(store, name)
    job = store.get_job(name, job_id, h.record.uid)
    assert job is not None
    try:
        return Driver(store, h, job, lambda line: None).run()
    finally:
        h.close()
        if down_after:
            cluster.down(store, name, PlainReporter(quiet=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
