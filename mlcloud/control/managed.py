"""Managed jobs (`mlcloud launch`, README "Managed jobs", docs/architecture.md): one job kept
alive across clusters NAME-1, NAME-2, ... by a watcher that climbs a ladder.

Rung 1 is the cluster's own controller (control/controller.py, run by the driver beside the
job): lost nodes replaced in place. When the cluster cannot be kept (every node lost, no
capacity for a replacement, `recover.max_restarts_in_place` spent), rung 2 makes the next
cluster at the cheapest allowed placement (zones, then regions, then clouds), starts the job
there with the same MLCLOUD_CHECKPOINT_URI (the node restores the newest checkpoint before the
job starts), then tears down what is left of the old one. Every rung is an event on the cluster
it concerns, with its reason and money. The state (state.ManagedJob) holds the truth, so a
watcher killed with -9 is replaced by the next `launch NAME`, which adopts the running job.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlcloud import state
from mlcloud.control import mover
from mlcloud.errors import BusyError, MlcloudError, NotFoundError, UsageError
from mlcloud.jobs import launch, outcome
from mlcloud.jobs.driver import Driver, Sink
from mlcloud.provision import handle, lifecycle
from mlcloud.report import Reporter
from mlcloud.spec.offers import Offer
from mlcloud.spec.task import TaskSpec

# why a cluster of the job ended (ManagedCluster.why)
LOST, SPENT, FAILED, DONE, CANCELLED, BUDGET = (
    "every node lost",
    "restarts in place spent",
    "job failed",
    "job ended",
    "cancelled",
    "budget spent",
)
DETACHED = "autoscale"  # the watcher of a job handed to `autoscale --all` (launch --detach)
IN_PLACE = ("node_replaced", "restart")  # the controller's events that are a rung-1 restart
RESTART_MARK = "(restart "  # in the watcher's `recover` events that restart the job
_STEP = re.compile(r"\bstep[ =:]+(\d+)")
_RESTORED = re.compile(r"checkpoints: restored step (\d+)")


@dataclass(frozen=True)
class Place:
    """Where a cluster of the job may go, with its price per node (USD/h; None: unknown)."""

    provider: str
    region: str | None
    zone: str | None
    instance_type: str | None
    price: float | None
    on_demand: float | None

    def __str__(self) -> str:
        return ":".join(p for p in (self.provider, self.region, self.zone) if p)


def places(spec: TaskSpec, now: float | None = None, near: str | None = None) -> list[Place]:
    """The allowed placements (recover.placements, default: the spec's provider in every
    region the catalog has an offer in) as offers, cheapest first: live prices where the
    cloud has them (mlcloud/spec/offers.py); those in region `near` (where the data is,
    `--near`) before the others."""
    from mlcloud.spec import catalog, plan
    from mlcloud.spec import offers as live

    provider = spec.provider or ("cloud" if spec.resources.gpus else "local")
    if provider != "cloud" and not plan.priced(provider):
        return [Place(provider, spec.region, spec.zone, None, 0.0, 0.0)]
    table = catalog.load()
    wanted = spec.recover.placements or (plan.clouds(table) if provider == "cloud" else ())
    found = live.offers(spec, wanted, now=now or time.time(), max_age=live.MAX_AGE_S)
    if not found:
        raise UsageError(
            f"no offer for {spec.resources.gpus or spec.resources.instance_type} in "
            f"recover.placements ({', '.join(wanted) or provider})"
        )
    out = []
    for o in found:
        row = catalog.lookup(table, o.provider, o.instance_type, o.region)
        out.append(
            Place(o.provider, o.region, o.zone, o.instance_type, o.price, row and row.on_demand)
        )
    return sorted(dict.fromkeys(out), key=lambda p: p.region != near)  # stable: by price


def req_near(store: state.Store, name: str) -> str | None:
    """The region `launch --near` found the data in, kept with the job."""
    job = store.get_managed(name)
    return job.request.get("near") if job else None


def me() -> str:
    """This process as a watcher: `pid@host`."""
    return f"{os.getpid()}@{socket.gethostname()}"


def restarts_of(store: state.Store, job: state.ManagedJob) -> int:
    """The job's restarts, from its clusters' events: each in place (the controller's) and
    each the watcher made (a new cluster, on_failure: restart)."""
    return sum(
        1
        for c in job.clusters
        if c.uid
        for _, kind, _, message in store.event_log(c.cluster, c.uid)
        if kind in IN_PLACE or (kind == "recover" and RESTART_MARK in message)
    )


def lead_key(name: str) -> str:
    """The lead (`state.lead`) a managed job's watcher holds: `launch` or `autoscale --all`."""
    return f"managed.{name}"


def request_dict(req: launch.JobRequest, pull: str | None, near: str | None) -> dict:
    """What to run, as the managed job keeps it: the environment's names only; near: the
    region the data is in (`--near`), whose placements go first."""
    return {
        "near": near,
        "workdir": str(req.workdir),
        "script": req.script,
        "args": list(req.args),
        "nproc_per_node": req.nproc_per_node,
        "env_names": sorted(req.envs),
        "setup": req.setup,
        "checkpoint_dir": req.checkpoint_dir,
        "pull": pull,
    }


def request_of(job: state.ManagedJob, envs: dict[str, str]) -> launch.JobRequest:
    """The job's request again (a resumed watcher), its environment from `envs`, else this
    process's environment: one line naming what neither has."""
    d = job.request
    missing = [n for n in d["env_names"] if n not in envs and n not in os.environ]
    if missing:
        raise UsageError(
            f"managed job {job.name}: its environment needs {', '.join(missing)}; pass "
            "them again (--env NAME=VALUE, or set them here)"
        )
    return launch.JobRequest(
        workdir=Path(d["workdir"]),
        script=d["script"],
        args=tuple(d["args"]),
        nproc_per_node=d["nproc_per_node"],
        envs={n: envs.get(n, os.environ.get(n, "")) for n in d["env_names"]},
        setup=d["setup"],
        checkpoint_dir=d["checkpoint_dir"],
        checkpoint_name=job.name,
    )


def stored_spec(spec: TaskSpec) -> dict:
    """The spec a managed job keeps: its environment lives in the request (names only)."""
    return {**spec.to_dict(), "envs": {}}


def spent(store: state.Store, job: state.ManagedJob, now: float | None = None) -> float:
    """USD the job has cost so far, across every cluster it made."""
    from mlcloud.spec.cost import accrued

    uids = {c.uid for c in job.clusters if c.uid}
    rows = [i for c in {c.cluster for c in job.clusters} for i in store.billing(c)]
    return accrued([i for i in rows if i.uid in uids], now or time.time())


class Watcher:
    """Keeps one managed job alive until it ends; run() returns the job's exit code."""

    def __init__(
        self,
        store: state.Store,
        name: str,
        spec: TaskSpec,
        req: launch.JobRequest,
        report: Reporter,
        sink: Sink | None,
    ):
        self.store, self.name, self.spec, self.req = store, name, spec, req
        self.report, self.sink = report, sink
        self.near = req_near(store, name)
        self.places = places(spec, near=self.near)
        self.last_step = 0  # the newest `step N` the job printed, on any of its clusters
        self.resuming = False  # a start whose resume point is not seen yet
        self.steps_seen = 0  # `step N` lines read: one more after a start is training again
        self.interrupted = False

    def _job(self) -> state.ManagedJob:
        job = self.store.get_managed(self.name)
        if job is None:
            raise NotFoundError(f"managed job {self.name!r} is gone from state")
        return job

    def run(self) -> int:
        try:
            return self._ladder()
        except KeyboardInterrupt:
            self.interrupted = True
            self._end(state.JOB_CANCELLED, 130, CANCELLED)
            raise

    def _ladder(self) -> int:
        while True:
            job = self._job()
            if job.status in state.JOB_DONE:
                return job.exit_code if job.exit_code is not None else 130
            cur = job.current
            if cur is None or not self._ready(cur):
                cur = self.make(job, None)
            if cur is None:
                job = self._job()
                return job.exit_code if job.exit_code is not None else 1
            ended = self._follow(cur)
            job = self._job()
            if job.status in state.JOB_DONE:  # cancelled meanwhile
                return job.exit_code if job.exit_code is not None else 130
            restarts = restarts_of(self.store, job)  # from the events: a resumed watch too
            self.store.update_managed(self.name, restarts=restarts)
            result, why = ended
            if result.status == state.JOB_SUCCEEDED:
                return self._end(state.JOB_SUCCEEDED, 0, DONE)
            if result.status == state.JOB_CANCELLED:
                return self._end(state.JOB_CANCELLED, result.exit_code or 130, CANCELLED)
            if why == mover.MOVED:  # the job's next cluster is up: start it there
                self.store.update_managed_cluster(self.name, cur.seq, ended=time.time(), why=why)
                self._down(cur.cluster)
                continue
            if why is None:  # the job failed by itself (or a rule stopped it)
                if (
                    self.spec.recover.on_failure == "restart"
                    and result.stopped_by is None
                    and restarts < self.spec.recover.max_restarts
                ):
                    self.store.update_managed(self.name, restarts=restarts + 1)
                    self.store.event(
                        cur.cluster,
                        "recover",
                        f"{result.line}; on_failure: restart (restart {restarts + 1} of "
                        f"{self.spec.recover.max_restarts})",
                    )
                    continue
                return self._end(state.JOB_FAILED, result.exit_code or 1, FAILED)
            if restarts >= self.spec.recover.max_restarts:
                self.store.event(
                    cur.cluster,
                    "recover",
                    f"{why}; recover.max_restarts ({self.spec.recover.max_restarts}) spent",
                )
                return self._end(state.JOB_FAILED, result.exit_code or 1, why)
            self.store.update_managed(self.name, restarts=restarts + 1)
            self.store.event(
                cur.cluster,
                "recover",
                f"{why}: the job moves to a new cluster (restart {restarts + 1} of "
                f"{self.spec.recover.max_restarts}; ${spent(self.store, job):.2f} so far)",
            )
            self.store.update_managed_cluster(self.name, cur.seq, ended=time.time(), why=why)
            if self.make(self._job(), replace(cur, why=why)) is None:
                job = self._job()
                return job.exit_code if job.exit_code is not None else 1
            self._down(cur.cluster)

    def start(self) -> None:
        """Make the first cluster and start the job there, for `autoscale --all` to watch
        (launch --detach): the job's environment reaches the nodes from here."""
        cur = self.make(self._job(), None)
        if cur is None:
            why = [c.why for c in self._job().clusters] or ["the budget is spent"]
            raise MlcloudError(f"managed job {self.name} did not start: {why[-1]}")
        with handle.open_cluster(self.store, cur.cluster) as h:
            self._start(h)
        self.store.update_managed(self.name, watcher=DETACHED)

    def spent(self) -> float:
        """USD the job has cost so far (the move weighs a restart against the budget)."""
        return spent(self.store, self._job())

    def _cancelled(self) -> bool:
        """Whether the job was cancelled (or is gone); any thread may ask: it opens its own
        connection."""
        store = self.store.reopen()
        try:
            job = store.get_managed(self.name)
        finally:
            store.close()
        return job is None or job.status in state.JOB_DONE

    def _ready(self, cur: state.ManagedCluster) -> bool:
        """Whether the job's current cluster is up (a killed watcher may have left it half
        made: `up` resumes it)."""
        rec = self.store.get_cluster(cur.cluster)
        return rec is not None and rec.status == state.UP

    def make(
        self,
        job: state.ManagedJob,
        old: state.ManagedCluster | None,
        at: list[Place] | None = None,
    ) -> state.ManagedCluster | None:
        """The job's next cluster at the cheapest place that has capacity (rung 2, or the
        first), among `at` when given (a move to a chosen place), else among today's offers;
        None when the budget is spent or no place has capacity (the job ended)."""
        from mlcloud.providers.base import CapacityError, QuotaError

        max_cost = self.spec.autoscale.max_cost
        cost = spent(self.store, job)
        if max_cost is not None and cost >= max_cost:
            where = old.cluster if old else self.name
            self.store.event(where, "budget", f"${cost:.2f} of ${max_cost:.2f} spent: no restart")
            self._end(state.JOB_FAILED, 1, BUDGET)
            return None
        refused: list[str] = []
        self.places = at or places(self.spec, near=self.near)  # today's prices
        for provider in dict.fromkeys(p.provider for p in self.places):
            mine = [p for p in self.places if p.provider == provider]
            first = mine[0]
            cur = self._job().current or self.store.add_managed_cluster(
                self.name, first.provider, first.region or "", first.zone or "", None
            )
            fallback = tuple(
                dict.fromkeys(p.region for p in mine[1:] if p.region and p.region != first.region)
            )
            try:
                return self.make_at(cur, first, old, fallback=fallback)
            except (CapacityError, QuotaError) as e:
                refused.append(f"{provider}: {e}")
        self._end(state.JOB_FAILED, 3, "no capacity: " + "; ".join(refused))
        return None

    def make_at(
        self,
        cur: state.ManagedCluster,
        place: Place | Offer,
        old: state.ManagedCluster | None,
        *,
        fallback: tuple[str, ...] = (),
        pin_zone: bool = False,
    ) -> state.ManagedCluster | None:
        """Make the job's cluster `cur` (its row recorded) at `place`: the region's zones (only
        place.zone with pin_zone), then the fallback regions. Rung 2's path, and the move's
        (control/mover.py). CapacityError or QuotaError when none has room (the row ended with
        why); None when the job was cancelled meanwhile (the cluster torn down)."""
        from mlcloud.providers.base import CapacityError, QuotaError

        max_cost = self.spec.autoscale.max_cost
        cost = spent(self.store, self._job())
        spec = replace(
            self.spec,
            name=cur.cluster,
            provider=place.provider,
            region=place.region,
            zone=place.zone if pin_zone else None,  # else the provider walks the region's zones
            resources=replace(self.spec.resources, instance_type=place.instance_type),
            autoscale=replace(
                self.spec.autoscale,
                max_cost=None if max_cost is None else max(max_cost - cost, 0.01),
            ),
        )
        price = place.price or 0.0
        where = ":".join(x for x in (place.provider, place.region, place.zone) if x)
        self.report.step(
            f"making {cur.cluster} on {where}"
            + (f" at ${price * spec.node_count:.2f}/h" if place.price else "")
        )
        try:
            rec = lifecycle.up(
                self.store, cur.cluster, spec, self.report, price=price,
                fallback_regions=fallback, cancelled=self._cancelled,
            )  # fmt: skip
        except (CapacityError, QuotaError) as e:
            if self._cancelled():
                return None
            self.store.update_managed_cluster(self.name, cur.seq, ended=time.time(), why=str(e))
            raise
        except MlcloudError:
            if self._cancelled():  # `cancel NAME` came while it was made: rolled back
                return None
            raise
        if self._job().status in state.JOB_DONE:  # cancelled while it was made
            self._down(cur.cluster)
            return None
        region = rec.spec.get("region") or ""
        zone = rec.spec.get("zone") or ""
        placed = (
            place
            if place.region == region
            else next(
                (p for p in self.places if (p.provider, p.region) == (rec.provider, region)), place
            )
        )
        per_hour = None if placed.price is None else placed.price * len(rec.nodes)
        self.store.update_managed_cluster(
            self.name, cur.seq, uid=rec.uid, region=region, zone=zone, price=per_hour
        )
        said = f"${per_hour:.2f}/h" if per_hour is not None else "unpriced"
        if old is None:
            self.store.event(cur.cluster, "launch", f"managed job {self.name} on {cur.cluster}")
        else:
            self.store.event(
                cur.cluster,
                "moved",
                f"managed job {self.name} moved from {old.cluster} ({old.why}) to "
                f"{cur.cluster} in {':'.join(x for x in (rec.provider, region, zone) if x)}"
                f" at {said}",
            )
        return next(c for c in self._job().clusters if c.seq == cur.seq)

    def _follow(self, cur: state.ManagedCluster) -> tuple[outcome.Outcome, str | None]:
        """Start the job on cur (or adopt the one running there) and follow it to its end:
        (how it ended, why the cluster cannot be kept or None)."""
        h = handle.open_cluster(self.store, cur.cluster)
        try:
            running = [
                j
                for j in self.store.jobs(cur.cluster, h.record.uid)
                if j.status not in state.JOB_DONE
            ]
            if running:
                job, adopt = running[-1], True
                if not self.store.claim_job(
                    cur.cluster, job.uid, job.job_id, job.driver_pid, os.getpid()
                ):
                    raise BusyError(f"job {job.job_id} on {cur.cluster} is followed elsewhere")
            else:
                job, adopt = self._start(h), False
            driver = Driver(self.store, h, job, self._sink, adopt=adopt)
            spent_in_place = threading.Event()
            stop = threading.Event()
            watch = threading.Thread(
                target=self._in_place,
                args=(h, job, driver, spent_in_place, stop),
                daemon=True,
            )
            watch.start()
            move = mover.Mover(self, h, job, adopt, stop)  # rung 3 (control/mover.py)
            move.start()
            try:
                driver.run()
            finally:
                stop.set()
                watch.join(timeout=10)
                move.join()
            result = driver.outcome
            assert result is not None
            if spent_in_place.is_set():
                return result, SPENT
            if move.moved:
                return result, mover.MOVED
            own = [
                e
                for e in driver.ends.values()
                if e.code != 0
                and (e.failure is not None or e.code not in (outcome.LOST, outcome.KILLED))
            ]
            lost = result.status == state.JOB_FAILED and not own and result.stopped_by is None
            return result, LOST if lost else None
        finally:
            h.close()

    def _start(self, h: handle.Handle) -> state.JobRecord:
        from mlcloud.remote import shell
        from mlcloud.state import cluster_lock, paths

        req = self.req
        with cluster_lock(h.record.name):
            job = self.store.new_job(
                h.record.name,
                h.record.uid,
                shell.join([req.script, *req.args]),
                len(h.nodes),
                launch.nproc_for(h, req.nproc_per_node),
                paths.logs_dir(h.record.name),
                driver_pid=os.getpid(),
            )
            launch.start(
                self.store,
                h,
                req,
                job,
                self.report,
                lambda i, line: self._sink(f"[node{i}] {line}"),
            )
        self.resuming = True  # the job starts again: what it resumes from is yet to be seen
        return job

    def _sink(self, text: str) -> None:
        """The job's lines, read for the steps it reached and the step it resumed from after
        a start (the node's restore, else its first step): the difference is steps lost."""
        m = _RESTORED.search(text)
        if m:
            self._resumed(int(m.group(1)))
        else:
            for m in _STEP.finditer(text):
                if self.resuming:  # no restore: it went on from what its disk had, or step 0
                    self._resumed(max(0, int(m.group(1)) - 1))
                self.last_step = max(self.last_step, int(m.group(1)))
                self.steps_seen += 1
        if self.sink is not None:
            self.sink(text)

    def _resumed(self, step: int) -> None:
        self.resuming = False
        lost = max(0, self.last_step - step)
        if lost:  # read on a follower's thread: a connection of its own
            store = self.store.reopen()
            try:
                job = store.get_managed(self.name)
                if job is not None:
                    store.update_managed(self.name, steps_lost=job.steps_lost + lost)
            finally:
                store.close()
        self.last_step = step

    def _in_place(
        self,
        h: handle.Handle,
        job: state.JobRecord,
        driver: Driver,
        spent_: threading.Event,
        stop: threading.Event,
    ) -> None:
        """Stop the job once its cluster's restarts in place pass the limit (through the
        driver, so its controller no longer brings it back): rung 2 follows."""
        limit = self.spec.recover.max_restarts_in_place
        if limit is None:
            return
        store = self.store.reopen()  # a connection of this thread's own
        try:
            while not stop.wait(1.0):
                if self._count(store, h.record.name, h.record.uid, job.submitted) > limit:
                    spent_.set()
                    store.event(
                        h.record.name,
                        "recover",
                        f"recover.max_restarts_in_place ({limit}) spent: stopping the job here",
                    )
                    driver.stand_down()  # a restart in place under way would undo the stop
                    driver._stop(list(driver.following), grace=5.0)
                    return
        finally:
            store.close()

    @staticmethod
    def _count(store: state.Store, cluster: str, uid: str, since: float) -> int:
        return sum(
            1 for t, kind, _, _ in store.event_log(cluster, uid) if kind in IN_PLACE and t >= since
        )

    def _end(self, status: str, code: int, why: str) -> int:
        """Record how the job ended, and why its current cluster ended."""
        job = self.store.get_managed(self.name)
        if job is not None and job.status not in state.JOB_DONE:
            self.store.update_managed(self.name, status=status, exit_code=code, ended=time.time())
            cur = job.current
            if cur is not None:
                self.store.update_managed_cluster(self.name, cur.seq, ended=time.time(), why=why)
                self.store.event(
                    cur.cluster, "managed", f"managed job {self.name} {status} ({code}): {why}"
                )
        return code

    def _down(self, cluster: str) -> None:
        """Tear a cluster of the job down; a failure is said, the job goes on."""
        try:
            lifecycle.down(self.store, cluster, self.report)
        except MlcloudError as e:
            self.report.warn(f"{cluster} not torn down: {e}; `mlcloud down {cluster}`")


def node_envs(store: state.Store, job: state.ManagedJob) -> dict[str, str]:
    """The job's environment as its current cluster's nodes hold it ({} when none answers):
    a watcher that did not launch the job (`autoscale --all`) starts it elsewhere with it."""
    names = job.request.get("env_names") or []
    last = last_job(store, job.name)
    if not names or last is None:
        return {}
    try:
        with handle.open_cluster(store, last[0]) as h:
            return launch.job_env(h, last[1], names, list(range(len(h.nodes))))
    except MlcloudError:
        return {}


def watch_detached(store: state.Store, name: str, report: Reporter) -> int:
    """`autoscale --all`'s watch of a job launched with --detach: the ladder, then its
    outputs into ./mlcloud-results/NAME/CLUSTER where the service runs, then every cluster
    down (the one whose pull failed kept, and said)."""
    from mlcloud.jobs import pull
    from mlcloud.spec.task import TaskSpec

    job = store.get_managed(name)
    if job is None:
        raise NotFoundError(f"no managed job named {name!r}")
    spec = TaskSpec.from_dict({**job.spec, "envs": {}})
    code = Watcher(store, name, spec, request_of(job, node_envs(store, job)), report, None).run()
    keep = None
    last = last_job(store, name)
    if last is not None:
        try:
            pull.pull(
                store, last[0], Path("mlcloud-results") / name / last[0], job_id=last[1],
                report=report,
            )  # fmt: skip
        except MlcloudError as e:
            keep = last[0]
            report.warn(f"{name}: outputs not pulled ({e}); {last[0]} is kept: `mlcloud pull`")
    down_all(store, name, report, keep=keep)
    return code


def down_all(store: state.Store, name: str, report: Reporter, keep: str | None = None) -> list[str]:
    """Tear down every cluster the job made (but `keep`, whose outputs were not all pulled);
    returns the clusters that could not be."""
    failed = []
    job = store.get_managed(name)
    for c in job.clusters if job else ():
        if c.cluster == keep or store.get_cluster(c.cluster) is None:
            continue
        try:
            lifecycle.down(store, c.cluster, report)
        except MlcloudError as e:
            report.warn(f"{c.cluster} not torn down: {e}")
            failed.append(c.cluster)
        if c.ended is None:
            store.update_managed_cluster(name, c.seq, ended=time.time(), why=job.status.lower())
    return failed


def last_job(store: state.Store, name: str) -> tuple[str, int] | None:
    """(cluster, job id) of the job's newest run, if its cluster is still there."""
    job = store.get_managed(name)
    for c in reversed(job.clusters if job else ()):
        rec = store.get_cluster(c.cluster)
        if rec is not None and rec.uid == c.uid:
            j = store.get_job(c.cluster, uid=rec.uid)
            return (c.cluster, j.job_id) if j else None
    return None


def cancel(store: state.Store, name: str, report: Reporter) -> state.ManagedJob:
    """Stop a managed job wherever it runs and tear down every cluster it made."""
    from mlcloud.jobs import cancel as job_cancel

    job = store.get_managed(name)
    if job is None:
        raise NotFoundError(f"no managed job named {name!r}")
    if job.status not in state.JOB_DONE:
        store.update_managed(name, status=state.JOB_CANCELLED, exit_code=130, ended=time.time())
        cur = job.current
        if cur is not None:
            store.event(cur.cluster, "managed", f"managed job {name} cancelled")
        for c in job.clusters:  # during a move the job runs on the cluster before the current
            rec = store.get_cluster(c.cluster) if c.ended is None else None
            if rec is not None and rec.status == state.UP and store.get_job(c.cluster, uid=rec.uid):
                try:
                    job_cancel.cancel(store, c.cluster, None)
                except MlcloudError as e:
                    report.warn(str(e))
    failed = down_all(store, name, report)
    if failed:
        raise MlcloudError(
            f"managed job {name} cancelled, but {', '.join(failed)} not torn down: "
            f"`mlcloud down {' '.join(failed)}`"
        )
    return store.get_managed(name) or job
