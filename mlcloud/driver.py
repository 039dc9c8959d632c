"""Follow a running job on every node: stream node-prefixed output to the terminal and the job's
log file, survive one node's hang, record how the job ended.

The job itself runs detached on the nodes, so this driver can run in the foreground (`train`),
in a background process (`train --detach`), or in `logs --follow` when the job's first follower
died (it then adopts the job: the nodes resend the whole output). Losing it does not lose the
job: the nodes keep its output and exit code, and reconciliation reads them.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from collections.abc import Callable

from mlcloud import launch, outcome, state
from mlcloud.cluster import Handle
from mlcloud.errors import MlcloudError
from mlcloud.outcome import LOST, NodeEnd

# After one node fails, the others get this long to fail on their own before being killed;
# torchrun can otherwise sit 300 s in its exit barrier after a worker aborts.
FAIL_GRACE = 15.0
# After one node succeeds, the others get this long to finish.
DONE_GRACE = 60.0
# After stopping the rest, how long to wait for them to report before calling them lost.
STOP_WAIT = 30.0
# How long to keep retrying the state write that records the job's end (a busy database).
RECORD_RETRY = 60.0
END_MARK = "mlcloud-end "  # node_ctl follow's last stderr line: the node's end, as JSON

Sink = Callable[[str], None]


class Driver:
    def __init__(
        self,
        store: state.Store,
        h: Handle,
        job: state.JobRecord,
        sink: Sink | None,
        adopt: bool = False,
        shown: dict[int, int] | None = None,
    ):
        """adopt: the nodes resend the whole output, so the log starts afresh; shown: lines
        per node the sink already had (not shown twice)."""
        self.store, self.h, self.job, self.sink = store, h, job, sink
        self.skip = dict(shown or {})
        self.ends: dict[int, NodeEnd] = {}
        self.order: list[int] = []
        self.cond = threading.Condition()
        self.log = open(job.log_path, "w" if adopt else "a", buffering=1)  # noqa: SIM115
        self.write_lock = threading.Lock()

    def _show(self, text: str) -> None:
        """To the sink, if it still takes output: a closed stdout (`| head -1`, a dead CI
        pipe) stops the showing, never the following, the log or the job's end."""
        if self.sink is None:
            return
        try:
            self.sink(text)
        except (OSError, ValueError):
            self.sink = None

    def emit(self, node: int, line: str) -> None:
        text = f"[node{node}] {line}"
        with self.write_lock:
            self.log.write(text + "\n")
            if self.skip.get(node, 0) > 0:
                self.skip[node] -= 1
            else:
                self._show(text)

    def note(self, line: str) -> None:
        text = f"[mlcloud] {line}"
        with self.write_lock:
            self.log.write(text + "\n")
            self._show(text)

    def _follow(self, i: int) -> None:
        t = self.h.transports[i]
        jd = launch.job_dir(self.h.nodes[i].root, self.job.job_id)
        try:
            result = t.run(
                f"{self.h.ctl(i)} follow {shlex.quote(jd)}", on_line=lambda line: self.emit(i, line)
            )
            end = _parse_end(result.exit_code, result.stderr)
            if end.code == outcome.KILLED and end.failure is None:
                said = [ln for ln in result.stderr.splitlines() if not ln.startswith(END_MARK)]
                if said:
                    self.emit(i, said[-1])
        except Exception as e:  # an unreachable node is a failed node, not a crashed driver
            self.emit(i, f"lost contact: {e}")
            end = NodeEnd(LOST)
        with self.cond:
            self.ends[i] = end
            self.order.append(i)
            self.cond.notify_all()

    def run(self, stop_on_interrupt: bool = True) -> int:
        """Follow to the end; returns the job's exit code (first failure wins, else 0).
        On Ctrl-C, stop the job (train's follower) or only stop following (logs --follow)."""
        n = len(self.h.nodes)
        threads = [threading.Thread(target=self._follow, args=(i,), daemon=True) for i in range(n)]
        for th in threads:
            th.start()
        try:
            self._wait_all(n)
        except KeyboardInterrupt:
            if not stop_on_interrupt:
                self.log.close()
                raise
            self.note("interrupted: stopping the job on every node (it checkpoints on SIGTERM)")
            self._stop_all(grace=10.0)
            for th in threads:
                th.join(timeout=30)
            self._finish(state.JOB_CANCELLED, 130)
            raise
        result = outcome.decide(self.job.job_id, self.ends, self.order)
        self.note(result.line)
        self._finish(result.status, result.exit_code)
        return result.exit_code

    def _wait_all(self, n: int) -> None:
        """Wait for every node; once one has ended, the others get a grace period, then are
        stopped, then get a last short wait: a node that neither ends nor answers is LOST."""
        deadline = None
        stopped_at = None
        with self.cond:
            while len(self.ends) < n:
                now = time.monotonic()
                if self.ends and deadline is None:
                    grace = FAIL_GRACE if any(e.code for e in self.ends.values()) else DONE_GRACE
                    deadline = now + grace
                pending = [i for i in range(n) if i not in self.ends]
                if stopped_at is not None and now >= stopped_at + STOP_WAIT:
                    for i in pending:
                        self.emit(i, "did not end after being stopped; giving up on this node")
                        self.ends[i] = NodeEnd(LOST)
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
        self._stop([i for i in range(len(self.h.nodes)) if i not in self.ends], grace)

    def _finish(self, status: str, code: int) -> None:
        """Record the end. The database may be busy (another command, a slow disk): retry,
        then say so; the nodes still hold the outcome, and `status` reconciles from them."""
        name, job = self.h.record.name, self.job
        deadline = time.monotonic() + RECORD_RETRY
        try:
            while True:
                try:
                    self.store.update_job(
                        name, job.uid, job.job_id, status=status, exit_code=code, ended=time.time()
                    )
                    self.store.event(name, "job", f"job {job.job_id} {status} ({code})")
                    return
                except MlcloudError as e:  # state's busy or I/O error, already one line
                    if time.monotonic() > deadline:
                        self.note(
                            f"could not record job {job.job_id}'s end ({status}, exit {code}) "
                            f"in the state database: {e}; the nodes keep it, and "
                            f"`mlcloud status {name}` records it from them"
                        )
                        return
                    time.sleep(1.0)
        finally:
            self.log.close()


def _parse_end(code: int, stderr: str) -> NodeEnd:
    """node_ctl follow's exit code, with its last word on how the job ended there."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(END_MARK):
            try:
                d = json.loads(line[len(END_MARK) :])
            except ValueError:
                break
            return NodeEnd(code, d.get("failure"), bool(d.get("cancelled")))
    return NodeEnd(code)


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
        return Driver(store, h, job, None).run()
    finally:
        h.close()
        if down_after:
            cluster.down(store, name, PlainReporter(quiet=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
