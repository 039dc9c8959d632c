"""The controller: each pass gathers a snapshot (provider listing, reachability and agent
samples, job, money), asks the pure policy, and applies its plan through the same engine
path as `up` and `train` (lifecycle.add_nodes, launch.prepare_nodes/launch_on, and
controller.stop_by_rule, the node agents' own stop).
Every decision is an event with its reason."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from mlcloud import state
from mlcloud.control import agentview
from mlcloud.control import policy as pol
from mlcloud.control.agentview import detach, probe
from mlcloud.errors import BusyError, MlcloudError
from mlcloud.jobs import launch
from mlcloud.parallel import fan_out
from mlcloud.providers.base import TERMINATED
from mlcloud.provision import bootstrap, handle, lifecycle
from mlcloud.provision.handle import Handle
from mlcloud.provision.lifecycle import down
from mlcloud.remote import shell
from mlcloud.remote.shell import path_arg, quote
from mlcloud.remote.transport import RemoteError, check
from mlcloud.report import Reporter
from mlcloud.spec.cost import accrued
from mlcloud.spec.task import parse_nodes
from mlcloud.state import cluster_lock

RETIRE_WAIT = 20.0  # how long a lost node's teardown may take before the pass goes on
# how long nodes made by a pass wait for the cluster lock to be recorded (or, the cluster going
# down, terminated): a `down` holds it through its teardown
RECORD_WAIT = 900.0


class GoingDown(MlcloudError):
    """The cluster left UP (`down`) while the pass was applying its plan: the pass ends."""


BUDGET_GRACE = 30.0  # SIGTERM to SIGKILL at a budget stop: the template checkpoints meanwhile


class Controller:
    """One cluster's controller. `step` makes one pass; `run` repeats it until stopped.

    on_join(i) is called after the job was started on a new node at position i (train's
    driver follows it); on_restart() after the job restarted on every node with a new head."""

    def __init__(
        self,
        store: state.Store,
        h: Handle,
        report: Reporter,
        on_join: Callable[[int], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        by: str = "",
    ):
        self.by = by  # which controller this is, named in its events (`autoscale --all`)
        self.store, self.h, self.report = store, h, report
        self.policy = pol.Policy.from_spec(h.record.spec)
        self.on_join, self.on_restart = on_join, on_restart
        self.misses: dict[str, int] = self._load_misses()
        self.grow_refusals, self.grow_refused_at = self._load_refusals()
        self.gone = False  # the cluster was torn down by a decision
        self.busy = threading.Event()  # set while a plan is being applied
        self.retired: set[str] = set()  # node ids the pass being applied retired already
        self.job_gone: set[str] = set()  # node ids where the job's processes went (job_lost)
        # the agents' samples held from pass to pass: each pass reads only the newest
        self.window = agentview.Window(self.policy.poll_seconds)

    # -- state kept between passes (a `--once` from cron picks up where the last one left)

    def _memory(self, suffix: str) -> str:
        """Where a pass's memory is kept, relative to the home (or its name on a shared
        store, so a controller in another home takes over where this one left)."""
        return f"autoscale/{self.h.record.uid}{suffix}"

    def _load_misses(self) -> dict[str, int]:
        from mlcloud.state import files

        try:
            raw = files.read(self._memory(".json"))
            return {str(k): int(v) for k, v in json.loads(raw or b"{}").items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_misses(self) -> None:
        from mlcloud.state import files

        if self.gone:  # the pass lock's file goes as the pass lets go of it (_pass_lock)
            files.remove(self._memory(".json"))
            files.remove(self._memory(".grow"))
            return
        files.write(self._memory(".json"), json.dumps(self.misses).encode())

    def _load_refusals(self) -> tuple[int, float | None]:
        from mlcloud.state import files

        try:
            n, at = json.loads(files.read(self._memory(".grow")) or b"null")
            return int(n), float(at)
        except (OSError, ValueError, TypeError):
            return 0, None

    def _refused(self, now: float | None) -> None:
        """Count a refused growth (now) or reset after one that worked (None)."""
        from mlcloud.state import files

        self.grow_refusals = self.grow_refusals + 1 if now is not None else 0
        self.grow_refused_at = now
        if now is None:
            files.remove(self._memory(".grow"))
        else:
            files.write(self._memory(".grow"), json.dumps([self.grow_refusals, now]).encode())

    def job_lost(self, node_id: str) -> None:
        """The follower saw the job's processes on this node end with no end of their own (all
        killed) while the job runs on: the next pass restarts the job (policy: job_gone). Ends
        seen while a plan is applied are the plan's own doing (a restart's stop)."""
        if not self.busy.is_set():
            self.job_gone.add(node_id)

    # -- gather

    def snapshot(self, now: float) -> pol.Snapshot:
        h = self.h
        n = len(h.nodes)
        read_at = time.monotonic()
        want = [self.window.lines(rec.node_id, read_at) for rec in h.nodes]
        probes = fan_out(
            lambda i: probe(h.transports[i], h.nodes[i].root, now, lines=want[i]),
            list(range(n)),
        )
        listed = {node.node_id: node.status for node in h.provider.list(h.ref)}
        views = []
        held: list[tuple[agentview.Sample, ...]] = []
        for i, (rec, p) in enumerate(zip(h.nodes, probes, strict=True)):
            self.misses[rec.node_id] = 0 if p.reachable else self.misses.get(rec.node_id, 0) + 1
            if p.reachable:
                self.window.merge(rec.node_id, read_at, want[i], p.samples)
            rows = self.window.held.get(rec.node_id, ()) if p.reachable else ()
            held.append(rows)
            newest = rows[-1].verdict if rows else None
            views.append(
                pol.NodeView(
                    i,
                    rec.node_id,
                    listed.get(rec.node_id, pol.MISSING),
                    unreachable=self.misses[rec.node_id],
                    silent_s=p.silent_s,
                    verdict=newest,
                    idle_since=agentview.since(rows, "idle"),
                    stalled_since=agentview.since(rows, "stalled"),
                    job_gone=p.reachable and rec.node_id in self.job_gone,
                )
            )
        self.misses = {k: v for k, v in self.misses.items() if k in listed or v}
        self.window.forget({rec.node_id for rec in h.nodes})
        job = self._job()
        running = job is not None and job.status in (state.JOB_STARTING, state.JOB_RUNNING)
        if not running:
            self.job_gone.clear()
        remaining = (
            agentview.job_remaining(held, job.job_id) if job is not None and running else None
        )
        intervals = [i for i in self.store.billing(h.record.name) if i.uid == h.record.uid]
        open_prices = [i.price for i in intervals if i.end is None]
        # a fixed size is the size it was made with, not what is left of it
        asked = h.record.spec.get("nodes")
        size = parse_nodes(asked)[1] if asked is not None else n
        low, high = launch.elastic_range(h) or (size, size)
        return pol.Snapshot(
            cluster=h.record.name,
            nodes=tuple(views),
            job=None if job is None else pol.JobView(job.job_id, running, remaining),
            cost_so_far=accrued(intervals, now),
            node_rate=max(open_prices, default=0.0),
            min_nodes=low,
            max_nodes=high,
            spares=h.provider.spares(h.ref),
            ended_at=job.ended if job is not None else None,
            grow_refusals=self.grow_refusals,
            grow_refused_at=self.grow_refused_at,
        )

    def _job(self) -> state.JobRecord | None:
        jobs = self.store.jobs(self.h.record.name, self.h.record.uid)
        return max(jobs, key=lambda j: j.job_id) if jobs else None

    # -- decide and apply

    def step(self, now: float | None = None) -> pol.Plan:
        """One pass: gather, decide, apply; returns the plan applied."""
        now = time.time() if now is None else now
        with self._pass_lock():
            self._reload()
            if self.gone or (self.h.nodes and all(n.status == TERMINATED for n in self.h.nodes)):
                self.gone = True  # stopped by a rule, here or by the agents: the rest is `down`'s
                return pol.Plan()
            snap = self.snapshot(now)
            plan = pol.decide(snap, self.policy, now)
            if plan.actions:
                self.busy.set()
                try:
                    self._apply(plan)
                except GoingDown:
                    self.gone = True  # `down` took the cluster meanwhile: the rest is its
                finally:
                    self.busy.clear()
            self._save_misses()
        return plan

    @contextlib.contextmanager
    def _pass_lock(self) -> Iterator[None]:
        """One pass at a time per cluster, whichever process runs it (`train`'s controller and
        a cron `autoscale --once`): the second waits, then decides on what the first did. On a
        shared store the lock is the store's (controllers in other homes, `autoscale --all`);
        in a home, a file lock there.

        On a home's file lock: a pass that finds the cluster gone removes the lock file while
        it still holds it; a pass that waited on that file then holds a lock on a name no
        longer there, which a third pass, creating the file anew, would not see: so a lock is
        good only while the file it locked is still the one under the name, and is taken again
        otherwise."""
        url = state.state_url()
        if url:
            from mlcloud.state import pg

            with pg.pass_lock(url, self.h.record.uid):
                yield
            return
        import fcntl
        import os

        from mlcloud.state import paths

        path = paths.private_dir(paths.home() / "autoscale") / f"{self.h.record.uid}.lock"
        while True:
            f = open(path, "a")  # held past this loop: closed below
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    current = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
                except FileNotFoundError:
                    current = False
            except BaseException:
                f.close()
                raise
            if current:
                break
            f.close()  # removed (or replaced) while this pass waited: take the new one
        try:
            yield
        finally:
            if self.gone:  # no pass of this cluster again: its lock file goes, still held
                path.unlink(missing_ok=True)
            f.close()

    def _reload(self) -> None:
        """Another controller may have replaced, dropped or stopped nodes since this one last
        looked: decide on the nodes state has now, not on a stale copy (a loss replaced twice
        left the first replacement running, forgotten by state)."""
        rec = self.store.get_cluster(self.h.record.name)
        if rec is None or rec.uid != self.h.record.uid or rec.status != state.UP:
            self.gone = True  # torn down, made again, or being torn down (STOPPING)
            return
        seen = [(n.node_id, n.status) for n in self.h.nodes]
        if [(n.node_id, n.status) for n in rec.nodes] != seen:
            self._refresh()

    def _event(self, kind: str, message: str, node: int | None = None) -> None:
        if self.by:
            message = f"{message} [controller {self.by}]"
        self.store.event(self.h.record.name, kind, message, node)
        self.report.info(message)

    def _apply(self, plan: pol.Plan) -> None:
        self.retired = set()
        actions = list(plan.actions)
        # a new head needs its replacements in place first
        restart = [a for a in actions if a.kind == pol.RESTART]
        rest = [a for a in actions if a.kind != pol.RESTART]
        dropped: list[int] = []
        for a in rest:
            if a.kind in (pol.BUDGET_STOP, pol.IDLE_DOWN):
                self._event(a.kind, a.reason)
                self._teardown(
                    a.kind, a.reason, grace=BUDGET_GRACE if a.kind == pol.BUDGET_STOP else 0.0
                )
                return
            if a.kind == pol.STALL:
                self._event("stall", a.reason)
            elif a.kind == pol.STALL_STOP:
                self._event("stall", a.reason + ": stopping the job")
                self._stop_job(range(len(self.h.nodes)), grace=10.0, rule=("stall", a.reason))
            elif a.kind == pol.REPLACE:
                self._event("node_lost", a.reason, a.node)
                assert a.node is not None
                if not self._replace(a.node, rejoin=not restart):
                    dropped.append(a.node)
            elif a.kind == pol.DROP:
                self._event("node_lost", a.reason, a.node)
                assert a.node is not None
                dropped.append(a.node)
            elif a.kind == pol.GROW:
                self._event("scale_up", a.reason)
                self._grow()
            elif a.kind == pol.SHRINK:
                self._event("scale_down", a.reason, a.node)
                assert a.node is not None
                self._stop_job([a.node], grace=BUDGET_GRACE)
                dropped.append(a.node)
        if dropped:
            self._drop(dropped)
        if restart and self.h.nodes:
            self._event("restart", restart[0].reason)
            self._restart()

    # -- the actions

    def _retire(self, rec: state.NodeRecord) -> None:
        """A node leaves the cluster: terminated where the provider can (a lost ssh host stays
        claimed until it answers again, for `down`). Its billing closes when the provider
        confirms it gone, however long after the pass went on; a node whose end is never
        confirmed bills until `down` confirms it."""
        h = self.h
        node = handle.provider_node(rec)
        errors: list[str] = []
        shared = self.store  # a connection is one thread's: the teardown opens its own

        def terminate() -> None:
            try:
                lifecycle.terminate(h.provider, h.ref, [node], h.record)
            except MlcloudError as e:
                errors.append(str(e))
                return
            store = shared.reopen()
            try:
                store.close_node_billing(h.record.uid, rec.node_id, time.time())
            finally:
                store.close()

        self.retired.add(rec.node_id)
        th = threading.Thread(target=terminate, daemon=True)
        th.start()
        th.join(RETIRE_WAIT)
        if th.is_alive() or errors:
            self.report.warn(
                f"{rec.node_id} not cleaned up ({errors[0] if errors else 'no answer yet'}); "
                f"it bills until its end is confirmed: `mlcloud down {h.record.name}` retries it"
            )

    def _set_nodes(self, records: list[state.NodeRecord]) -> None:
        """Record the cluster's nodes (positions renumbered) and refresh the handle in place,
        so a driver sharing it follows the same nodes. The caller holds the cluster lock
        (`_recording`)."""
        records = [replace(r, idx=i) for i, r in enumerate(records)]
        self.store.set_nodes(self.h.record.name, records)
        self._refresh()

    # The cluster lock is held only around state changes, never through a node's making or
    # bootstrap (minutes): `down`, `train` and `up` wait on it 30 s at most. A replacement
    # (or growth) records its intent under it before asking the provider; `down` marks the
    # cluster STOPPING under it; the replacement, about to record its node, finds that and
    # terminates what it made instead, and `down` has terminated by tag whatever existed.

    def _going_down(self) -> bool:
        """Whether the cluster left UP meanwhile (`down` marks it STOPPING, then drops it; an
        `up` may have made it again). Any thread may ask: it opens its own connection."""
        store = self.store.reopen()
        try:
            rec = store.get_cluster(self.h.record.name)
        finally:
            store.close()
        return rec is None or rec.uid != self.h.record.uid or rec.status != state.UP

    def _intent(self, message: str, node: int | None = None) -> None:
        """Say, under the cluster lock, that a node is about to be asked for, once the cluster
        is seen still UP there (`down` comes before or after, never between)."""
        with cluster_lock(self.h.record.name):
            if self._going_down():
                raise GoingDown()
            self._event("intent", message, node)

    @contextlib.contextmanager
    def _recording(
        self, made: lifecycle.NewNodes | None = None
    ) -> Iterator[list[state.NodeRecord]]:
        """The cluster lock, to record a change on the nodes state has now (yielded). A
        cluster `down` took meanwhile gets nothing recorded: what this pass made is
        terminated and the pass ends (GoingDown). With nodes made, the lock is waited for as
        long as it takes (a `down` holds it through its teardown): they must be recorded or
        terminated, never left."""
        name = self.h.record.name
        failed: BaseException | None = None
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(cluster_lock(name, timeout=RECORD_WAIT if made else 30.0))
            except BusyError as e:
                if made is None:
                    raise
                failed = e  # never recorded: terminated (below)
            else:
                rec = self.store.get_cluster(name)
                if rec is not None and rec.uid == self.h.record.uid and rec.status == state.UP:
                    try:
                        yield list(rec.nodes)
                    except BaseException as e:  # not recorded: what was made goes (below)
                        failed = e
                    else:
                        if made is not None:
                            lifecycle.keep(self.store, self.h.provider, made)
                        return
        if made is not None:
            why = "not recorded" if failed else f"{name} is going down"
            self.report.info(f"{why}: terminating the node(s) just made")
            lifecycle.discard(self.store, self.h.provider, self.h.record, made)
        raise failed or GoingDown()

    def _refresh(self) -> None:
        """The handle follows state's nodes, in place (a driver sharing it follows the same)."""
        fresh = handle.open_cluster(self.store, self.h.record.name)
        # nodes that stay keep their connection (a driver may be following over it)
        old = {r.node_id: t for r, t in zip(self.h.nodes, self.h.transports, strict=True)}
        transports = []
        for r, t in zip(fresh.nodes, fresh.transports, strict=True):
            if r.node_id in old:
                t.close()
                transports.append(old.pop(r.node_id))
            else:
                transports.append(t)
        for t in old.values():
            t.close()
        self.h.record = fresh.record
        self.h.transports[:] = transports

    def _rebudget(self) -> None:
        """After a resize, every node's agent gets the budget deadline at the new rate (what
        is left of max_cost over what the nodes now bill per hour)."""
        if self.policy.max_cost is None:
            return
        h = self.h
        billing = [i for i in self.store.billing(h.record.name) if i.uid == h.record.uid]
        due = bootstrap.budget_deadline(self.policy.max_cost, billing, time.time())

        def one(i: int) -> None:
            try:
                bootstrap.set_deadline(h.transports[i], h.nodes[i].root, due)
            except (MlcloudError, ValueError) as e:
                self.report.warn(f"node{i}: the budget deadline was not updated: {e}")

        fan_out(one, list(range(len(h.nodes))))

    def _replace(self, i: int, rejoin: bool) -> bool:
        """A new node in place of node i; the job (elastic) starts on it and rejoins. False
        when none could be had."""
        lost = self.h.nodes[i]
        self._retire(lost)
        self._intent(
            f"node{i}: a node asked of {self.h.provider.name} in place of {lost.node_id}", i
        )
        try:
            made = lifecycle.add_nodes(
                self.store, self.h, 1, self.report, cancelled=self._going_down
            )
        except MlcloudError as e:
            if self._going_down():
                raise GoingDown() from e
            self._event("node_lost", f"node{i} could not be replaced: {e}", i)
            return False
        (new,) = made.records
        with self._recording(made) as records:
            ids = [r.node_id for r in records]
            at = ids.index(lost.node_id) if lost.node_id in ids else len(records)
            records[at : at + 1] = [new]
            self._set_nodes(records)
        self._rebudget()
        self._event("node_replaced", f"node{at}: {lost.node_id} replaced by {new.node_id}", at)
        if rejoin:
            self._join([at])
        return True

    def _grow(self) -> None:
        self._intent(f"a node more asked of {self.h.provider.name}")
        try:
            made = lifecycle.add_nodes(
                self.store, self.h, 1, self.report, cancelled=self._going_down
            )
        except MlcloudError as e:
            if self._going_down():
                raise GoingDown() from e
            self._refused(time.time())
            wait = pol.grow_backoff(self.grow_refusals)
            self._event("scale_up", f"no node added: {e}; next try in {wait:.0f} s")
            return
        self._refused(None)
        with self._recording(made) as records:
            self._set_nodes([*records, *made.records])
        self._rebudget()
        self._join([len(self.h.nodes) - 1])

    def _drop(self, positions: list[int]) -> None:
        leaving = [self.h.nodes[i] for i in positions]
        for rec in leaving:
            if rec.node_id not in self.retired:
                self._retire(rec)
        ids = {r.node_id for r in leaving}
        with self._recording() as records:
            self._set_nodes([r for r in records if r.node_id not in ids])
        self._rebudget()

    def _running_job(self) -> tuple[state.JobRecord, launch.JobRequest, launch.Rendezvous] | None:
        job = self._job()
        if job is None or job.status not in (state.JOB_STARTING, state.JOB_RUNNING):
            return None
        saved = launch.load_request(job)
        if saved is None:
            return None
        return job, *saved

    def _join(self, positions: list[int]) -> None:
        """Start the running elastic job on new nodes: they join its rendezvous."""
        running = self._running_job()
        if running is None or launch.elastic_range(self.h) is None:
            return
        job, req, rdzv = running
        others = [i for i in range(len(self.h.nodes)) if i not in positions]
        req = replace(req, envs=launch.job_env(self.h, job.job_id, list(req.envs), others))
        launch.prepare_nodes(self.h, req, positions, self.report, lambda i, line: None)
        launch.launch_on(self.h, req, job.job_id, positions, rdzv)
        for i in positions:
            self._event(
                "node_joined", f"node{i} ({self.h.nodes[i].node_id}) joined job {job.job_id}", i
            )
            if self.on_join:
                self.on_join(i)

    def _restart(self) -> None:
        """The head is gone: stop the job everywhere (the survivors checkpoint), then start it
        again with node 0 as the new head and a new rendezvous; the newest checkpoint on any
        node is where it resumes (the template broadcasts it)."""
        running = self._running_job()
        if running is None:
            return
        job, req, rdzv = running
        h = self.h
        everyone = list(range(len(h.nodes)))
        req = replace(req, envs=launch.job_env(h, job.job_id, list(req.envs), everyone))
        self._stop_job(everyone, grace=10.0)

        def reset(i: int) -> None:
            jd = quote(launch.job_dir(h.nodes[i].root, job.job_id))
            h.transports[i].run(
                f"rm -f {jd}/exit_code {jd}/failure.json {jd}/waiter.pid; "
                f"mv -f {jd}/output.log {jd}/output.{rdzv.number}.log 2>/dev/null; true"
            )  # the earlier run's output is kept beside, not shown again

        fan_out(reset, everyone)
        self.job_gone.clear()  # it starts afresh on every node
        new = launch.Rendezvous(launch.free_port(h), rdzv.number + 1, rdzv.nproc)
        launch.save_request(job, req, new)
        launch.prepare_nodes(h, req, everyone, self.report, lambda i, line: None)
        launch.launch_on(h, req, job.job_id, everyone, new)
        self._event(
            "restart",
            f"job {job.job_id} restarted on {len(everyone)} node(s), head {h.nodes[0].node_id}",
        )
        if self.on_restart:
            self.on_restart()

    def _stop_job(self, positions, grace: float, rule: tuple[str, str] | None = None) -> None:
        """rule: (kind, reason) that the job's end names (stall, budget, idle)."""
        job = self._job()
        if job is None:
            return

        def one(i: int) -> None:
            try:
                launch.kill(self.h, i, job.job_id, grace, rule=rule)
            except MlcloudError as e:
                self.report.warn(f"node{i}: could not stop the job: {e}")

        fan_out(one, list(positions))

    def _teardown(self, kind: str, reason: str, grace: float) -> None:
        """Budget stop or idle: checkpoint (SIGTERM) and wait `grace`, then stop the cluster
        as its agents would (stop_by_rule below)."""
        if grace and self._running_job() is not None:
            self._stop_job(range(len(self.h.nodes)), grace=grace, rule=(kind, reason))
        self.gone = True
        stop_by_rule(self.store, self.h, kind, reason, self.report)

    # -- the loop

    def run(self, interval: float | None = None, stop: threading.Event | None = None) -> None:
        """Pass after pass every `interval` s (default: poll_seconds) until `stop` is set or
        the cluster was torn down; a pass that fails is reported and the next one waits twice
        as long as the last, up to 5 minutes (policy.pass_wait)."""
        stop = stop or threading.Event()
        every = interval or self.policy.poll_seconds
        failures = 0
        try:
            while not stop.is_set() and not self.gone:
                began = time.monotonic()
                try:
                    self.step()
                    failures = 0
                except MlcloudError as e:
                    failures += 1
                    wait = pol.pass_wait(failures, every)
                    self.report.warn(f"autoscale pass failed: {e}; next pass in {wait:.0f}s")
                stop.wait(max(0.0, pol.pass_wait(failures, every) - (time.monotonic() - began)))
        finally:
            if not self.gone:
                self.detach()

    def detach(self) -> None:
        """Leaving: take the heartbeats away, so the agents do not count this controller lost
        (not waiting on a node that did not answer the last pass: it got no heartbeat)."""
        answered = [i for i, n in enumerate(self.h.nodes) if not self.misses.get(n.node_id, 0)]
        fan_out(lambda i: detach(self.h.transports[i], self.h.nodes[i].root), answered)


STOP_GRACE = 10.0  # a rule's stop: SIGTERM to SIGKILL on each node (the job checkpointed before)


def stop_by_rule(store: state.Store, h: Handle, kind: str, reason: str, report: Reporter) -> None:
    """A rule (idle, budget) ends the cluster, from the controller as the node agents end it
    themselves: machines mlcloud owns are terminated (`down`); elsewhere (local, ssh) each
    node's agent stop runs, which ends the cluster's processes and writes the stop record and
    the event where `status` and `events` read them, and the nodes are marked stopped. Their
    directories (checkpoints, events) stay until `down`."""
    if h.provider.capabilities.owns_machines:
        down(store, h.record.name, report)
        return
    line = f"{shell.AGENT} stop . {quote(kind)} {quote(reason)} {STOP_GRACE}"

    def one(i: int) -> None:
        t = h.transports[i]
        try:
            r = t.run(
                f"cd {path_arg(h.nodes[i].root)} && {quote(t.python)} {line}",
                timeout=STOP_GRACE + 60,
            )
            check(r, t, "stopping the node")
        except RemoteError as e:  # a node lost meanwhile: status shows it as last seen
            report.warn(str(e))

    fan_out(one, list(range(len(h.nodes))))
    from mlcloud.control import nodeevents

    nodeevents.gather(store, h)
