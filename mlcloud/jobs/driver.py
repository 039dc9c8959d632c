"""Follow a running job on every node: stream node-prefixed output to the terminal and the job's
log file, survive one node's hang, record how the job ended.

The job itself runs detached on the nodes, so this driver can run in the foreground (`train`),
in a background process (`train --detach`), or in `logs --follow` when the job's first follower
died (it then adopts the job: the nodes resend the whole output). Losing it does not lose the
job: the nodes keep its output and exit code, and reconciliation reads them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable

from mlcloud import state
from mlcloud.errors import MlcloudError
from mlcloud.jobs import launch, outcome
from mlcloud.jobs.outcome import LOST, NodeEnd
from mlcloud.provision import handle, lifecycle
from mlcloud.provision.handle import Handle
from mlcloud.remote.shell import quote
from mlcloud.state import timeouts

# After one node fails, the others get FAIL_GRACE s (mlcloud/timeouts.py, default 15) to fail on
# their own before being killed; torchrun can otherwise sit 300 s in its exit barrier after a
# worker aborts.
# After one node succeeds, the others get this long to finish.
DONE_GRACE = 60.0
# After stopping the rest, how long to wait for them to report before calling them lost.
STOP_WAIT = 30.0
# How long to keep retrying the state write that records the job's end (a busy database).
RECORD_RETRY = 60.0
# Elastic job under a controller: once every followed node has ended without success, how long
# the controller has to bring the job back (lost-node detection, a new head) before the end
# is recorded. Held open while the controller is applying a plan.
RECOVERY_WAIT = 30.0
END_MARK = "mlcloud-end "  # node_ctl follow's last stderr line: the node's end, as JSON
# torch's benign teardown noise (Driver._noise): the lines that open a c10d "Failed to recv"
# C++ trace, the trace's own lines, and the rendezvous shutdown warning that follows it
NOISE_STARTS = ("Failed to recv, got 0 bytes", "] recvVector failed on SocketImpl")
NOISE_TRACE = ("Exception raised from ", "frame #", "<omitting python frames>")
NOISE_RDZV = "has failed to shutdown the rendezvous"

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
        self.elastic = launch.elastic_range(h) is not None
        self.following: dict[int, threading.Thread] = {}
        self.controller = None  # the autoscale controller running beside, if any
        self._control_stop: threading.Event | None = None
        self._control_thread: threading.Thread | None = None
        self.outcome: outcome.Outcome | None = None  # how the job ended, once it has
        self.stopping = False  # this driver stopped nodes: what ends now is its doing
        self.in_noise: set[int] = set()  # nodes in the middle of a trace of torch's noise
        self.hidden = 0  # lines of it kept from the terminal (the log has them)

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
            elif not self._noise(node, line):
                self._show(text)

    def _noise(self, node: int, line: str) -> bool:
        """torch's known teardown noise: a node's c10d store closing under the others as a job
        ends prints "Failed to recv" with a C++ trace (frame #0 ...), and a rendezvous that
        could not be shut down says so. The log keeps it; the terminal is spared it."""
        if any(mark in line for mark in NOISE_STARTS):
            self.in_noise.add(node)
            self.hidden += 1
            return True
        if node in self.in_noise:
            if not line.strip() or line.startswith(NOISE_TRACE):
                self.hidden += 1
                return True
            self.in_noise.discard(node)
        if NOISE_RDZV in line:
            self.hidden += 1
            return True
        return False

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
                f"{self.h.ctl(i)} follow {quote(jd)}", on_line=lambda line: self.emit(i, line)
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
            if self.following.get(i) is threading.current_thread():
                self.ends[i] = end
                self.order.append(i)
                ctl = self.controller
                if ctl is not None and self._lost(end) and self._may_recover():
                    ctl.job_lost(self.h.nodes[i].node_id)  # the others would wait in vain
            self.cond.notify_all()

    def follow(self, i: int) -> None:
        """Follow node i (again: a node that joined the job in a lost one's place)."""
        self._follow_afresh([i])

    def follow_all(self) -> None:
        """Follow every node afresh: the job was restarted on all of them (a new head)."""
        self._follow_afresh(list(range(len(self.h.nodes))))

    def _follow_afresh(self, nodes: list[int]) -> None:
        """Forget how these nodes ended before, at once (a half-reset would look like an end
        to the waiter), and follow them."""
        threads = {i: threading.Thread(target=self._follow, args=(i,), daemon=True) for i in nodes}
        with self.cond:
            if len(nodes) == len(self.h.nodes):
                self.stopping = False  # the job starts afresh everywhere
            for i in nodes:
                self.ends.pop(i, None)
            self.order = [j for j in self.order if j not in threads]
            self.following.update(threads)
            self.cond.notify_all()
        for th in threads.values():
            th.start()

    def _may_recover(self) -> bool:
        """Whether a node's lost part may restart the job: not when this driver stopped it (the
        job is ending) nor once a node failed on its own (a restart would fail again)."""
        return not self.stopping and not any(
            e.code != 0 and not self._lost(e) for e in self.ends.values()
        )

    def _lost(self, end: NodeEnd) -> bool:
        """An elastic job goes on without a node whose processes or connection went away."""
        return self.elastic and end.code in (LOST, outcome.KILLED) and end.failure is None

    def run(self, stop_on_interrupt: bool = True) -> int:
        """Follow to the end; returns the job's exit code (first failure wins, else 0).
        On Ctrl-C, stop the job (train's follower) or only stop following (logs --follow)."""
        self.follow_all()
        stop = self._control_stop = threading.Event()
        control = self._control_thread = self._control(stop) if controlled(self.h) else None
        try:
            self._wait_recovered()
        except KeyboardInterrupt:
            stop.set()
            if not stop_on_interrupt:
                self.log.close()
                raise
            self.note("interrupted: stopping the job on every node (it checkpoints on SIGTERM)")
            try:
                self._stop_all(grace=10.0, cancelled=True)
                for th in list(self.following.values()):
                    th.join(timeout=30)
            finally:  # a second Ctrl-C cuts the wait short, never the record: cancelled
                self.outcome = outcome.Outcome(
                    state.JOB_CANCELLED, 130, f"job {self.job.job_id} interrupted", "interrupt"
                )
                self._finish(state.JOB_CANCELLED, 130)
            raise
        finally:
            stop.set()
            if control is not None:
                control.join(timeout=60)
        ends = self.ends
        if self.elastic and any(e.code == 0 for e in ends.values()):
            ends = {i: e for i, e in ends.items() if not self._lost(e)}
        result = outcome.decide(self.job.job_id, ends, [i for i in self.order if i in ends])
        if result.status != state.JOB_SUCCEEDED and not result.stopped_by and self._torn_down():
            # `down` ran meanwhile: it stopped the job, which did not fail on its own (a rule
            # that tears the cluster down, a budget on a cloud, is named as the rule)
            name = self.h.record.name
            result = outcome.Outcome(
                state.JOB_CANCELLED,
                result.exit_code or 130,
                f"job {self.job.job_id} stopped by `mlcloud down`: cluster {name} was torn "
                "down while it ran",
                "down",
            )
        self.outcome = result
        if self.hidden and result.status != state.JOB_SUCCEEDED:
            self.note(
                f"{self.hidden} line(s) of torch's teardown noise (c10d 'Failed to recv' "
                f"traces) were not shown; the log has them: {self.job.log_path}"
            )
        self.note(result.line)
        self._finish(result.status, result.exit_code)
        return result.exit_code

    def _torn_down(self) -> bool:
        """Whether `down` took (or is taking) the job's cluster: marked STOPPING, or gone."""
        try:
            rec = self.store.get_cluster(self.h.record.name)
        except MlcloudError:
            return False
        return rec is None or rec.uid != self.job.uid or rec.status == state.STOPPING

    def _control(self, stop: threading.Event) -> threading.Thread:
        """Run the cluster's controller beside the following: lost nodes are replaced and
        rejoin the job, a lost head restarts it; its decisions show in the job's output."""

        def loop() -> None:
            from mlcloud.control.controller import Controller

            store = state.open_store()  # a connection of this thread's own
            try:
                ctl = Controller(store, self.h, _NoteReporter(self), self.follow, self.follow_all)
                self.controller = ctl
                ctl.run(stop=stop)
            except Exception as e:  # noqa: BLE001 (the job goes on without its controller)
                self.note(f"autoscale stopped: {e}")
            finally:
                store.close()

        th = threading.Thread(target=loop, daemon=True)
        th.start()
        return th

    def stand_down(self, timeout: float = 120.0) -> None:
        """End the controller beside the job, after the pass it may be applying (a restart
        under way finishes first), so that what stops the job next stays stopped, and the
        end is not held for a recovery that will not come."""
        if self._control_stop is not None:
            self._control_stop.set()
        if self._control_thread is not None:
            self._control_thread.join(timeout=timeout)
        with self.cond:
            self.controller = None
            self.cond.notify_all()

    def _recovering(self) -> bool:
        ctl = self.controller
        return ctl is not None and ctl.busy.is_set()

    def _wait_recovered(self) -> None:
        """Wait for the job's end; an elastic job under a controller that ended without success
        gets RECOVERY_WAIT for the controller to bring it back (a node joins, a new head)."""
        while True:
            self._wait_all()
            if not (self.elastic and self.controller is not None):
                return
            if any(e.code == 0 for e in self.ends.values()):
                return
            deadline = time.monotonic() + RECOVERY_WAIT
            with self.cond:
                while self._all_ended() and (time.monotonic() < deadline or self._recovering()):
                    self.cond.wait(timeout=0.5)
                if self._all_ended():
                    return

    def _all_ended(self) -> bool:
        return all(i in self.ends for i in self.following)

    def _wait_all(self) -> None:
        """Wait for every node; once one has ended, the others get a grace period, then are
        stopped, then get a last short wait: a node that neither ends nor answers is LOST.
        In an elastic job a lost node is no end: the others go on without it."""
        deadline = None
        stopped_at = None
        with self.cond:
            while not self._all_ended():
                now = time.monotonic()
                ended = [e for e in self.ends.values() if not self._lost(e)]
                if not ended:  # none yet, or the ends seen were forgotten (a restart)
                    deadline = stopped_at = None
                elif deadline is None:
                    failed = any(e.code for e in ended)
                    grace = timeouts.seconds("FAIL_GRACE") if failed else DONE_GRACE
                    deadline = now + grace
                pending = [i for i in self.following if i not in self.ends]
                if stopped_at is not None and now >= stopped_at + STOP_WAIT:
                    for i in pending:
                        self.emit(i, "did not end after being stopped; giving up on this node")
                        self.ends[i] = NodeEnd(LOST)
                        self.order.append(i)
                    return
                if deadline is not None and now >= deadline and stopped_at is None:
                    self.note(
                        f"node(s) {', '.join(f'node{i}' for i in pending)} still running "
                        f"after node{self.order[0] if self.order else '?'} ended; stopping them"
                    )
                    self.cond.release()
                    try:
                        self._stop(pending, grace=5.0)
                    finally:
                        self.cond.acquire()
                    stopped_at = time.monotonic()
                    continue
                self.cond.wait(timeout=0.5)

    def _stop(self, nodes: list[int], grace: float, cancelled: bool = False) -> None:
        """Stop the job on these nodes; one that cannot be reached is reported, not raised."""
        from mlcloud.parallel import fan_out

        self.stopping = True

        def one(i: int) -> None:
            try:
                launch.kill(self.h, i, self.job.job_id, grace, cancelled)
            except MlcloudError as e:
                self.emit(i, f"could not stop the job there: {e}")

        fan_out(one, nodes)

    def _stop_all(self, grace: float, cancelled: bool = False) -> None:
        self._stop([i for i in self.following if i not in self.ends], grace, cancelled)

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


def controlled(h: Handle) -> bool:
    """A cluster with an elastic size, or `autoscale:` keys set away from their defaults,
    gets a controller while followed (the defaults alone are the agents' to enforce)."""
    from dataclasses import asdict

    from mlcloud.spec.task import AutoscaleSpec

    auto = h.record.spec.get("autoscale") or {}
    defaults = asdict(AutoscaleSpec())
    return launch.elastic_range(h) is not None or any(
        auto.get(k, v) != v for k, v in defaults.items()
    )


class _NoteReporter:
    """The controller's words, as `[mlcloud]` lines of the job's output."""

    def __init__(self, driver: Driver):
        self.driver = driver

    def step(self, message: str) -> None:
        self.driver.note(message)

    info = step

    def warn(self, message: str) -> None:
        self.driver.note(f"warning: {message}")


def _parse_end(code: int, stderr: str) -> NodeEnd:
    """node_ctl follow's exit code, with its last word on how the job ended there."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(END_MARK):
            try:
                d = json.loads(line[len(END_MARK) :])
            except ValueError:
                break
            return NodeEnd(code, d.get("failure"), bool(d.get("cancelled")), d.get("stopped"))
    return NodeEnd(code)


def main(argv: list[str]) -> int:
    """Background driver for `train --detach`:
    python -m mlcloud.jobs.driver CLUSTER JOB [--down]."""
    from mlcloud.report import PlainReporter

    name, job_id, down_after = argv[0], int(argv[1]), "--down" in argv
    store = state.open_store()
    h = handle.open_cluster(store, name)
    job = store.get_job(name, job_id, h.record.uid)
    assert job is not None
    try:
        return Driver(store, h, job, None).run()
    finally:
        h.close()
        if down_after:
            lifecycle.down(store, name, PlainReporter(quiet=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
