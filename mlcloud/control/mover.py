"""Rung 3 of the managed-job ladder: the move for price (README "Managed jobs",
docs/architecture.md "Managed jobs").

While the job runs on its cluster, a Mover thread (started by the watcher beside the driver)
asks every MOVE_CHECK_EVERY seconds for the live offers among the allowed placements
(spec/offers.py; a price older than MOVE_PRICE_MAX_AGE never moves the job) and the pure rule
(control/moves.py) for a verdict, with: the cluster's own
offer, the time the job takes to resume (the newest `training` event of the job: a cluster's
time from being asked for to the job's first progress there; RESUME_DEFAULT_S until one is
measured), the work since the newest checkpoint in the bucket (its manifest's time; without a
bucket, since the job started), and the job's remaining time by its progress (the agents'
samples). A go is an event (`move`) on the current cluster; then the move waits for a
checkpoint newer than the one at the decision (MOVE_CHECKPOINT_WAIT), decides again on fresh
figures, makes the new cluster first (the watcher's rung-2 path, `Watcher.make_at`), copies the
newest checkpoint when the new cloud keeps checkpoints elsewhere (jobs/checkpoint_copy.py,
verified, manifest last), and only then stops the job on the old cluster. The watcher starts
the job on the new cluster (the node restores the checkpoint first) and tears the old one down
(why it ended: `moved`). A move is a restart (recover.max_restarts) and is paid from the
budget. Anything that fails before the old job is stopped leaves the job where it was, the new
cluster torn down, and an event saying why; a failed move is not tried again from this cluster
(a cloud that refused or a copy that did not verify would fail the same way on the next check).
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import replace

from mlcloud import state
from mlcloud.errors import MlcloudError
from mlcloud.jobs import launch
from mlcloud.provision.handle import Handle
from mlcloud.spec import buckets
from mlcloud.spec import offers as live
from mlcloud.state import timeouts

MOVED = "moved"  # why the old cluster of a move ended (ManagedCluster.why)
RESUME_DEFAULT_S = 300.0  # a new cluster's boot, setup and restore, until the job measured one
POLL_S = 1.0  # how often the thread looks at the job (and at the bucket, while it waits)


class Mover(threading.Thread):
    """Watches one run of the job on one cluster for a cheaper place; `moved` once the job's
    next cluster is up and the job was stopped here for it."""

    def __init__(self, watcher, h: Handle, job: state.JobRecord, adopted: bool, stop):
        super().__init__(daemon=True, name=f"mover-{h.record.name}")
        self.watcher, self.h, self.job, self.adopted, self.stop = watcher, h, job, adopted, stop
        self.moved = False

    def run(self) -> None:
        from mlcloud.spec import plan

        moves = self.watcher.spec.recover.move_savings is not None
        if self.adopted and not (moves and plan.priced(self.h.record.provider)):
            return  # nothing to measure, nothing to move
        store = self.watcher.store.reopen()  # a connection of this thread's own
        twin = copy.copy(self.watcher)  # the watcher's paths on this thread's connection
        twin.store = store
        try:
            self._watch(twin, store)
        except Exception as e:  # noqa: BLE001 - a move that cannot be made never ends the job
            try:
                store.event(self.h.record.name, "move", f"no move: {e}")
            except Exception:  # noqa: BLE001, S110 - the store itself failed: nothing to tell
                pass
        finally:
            store.close()

    def _watch(self, twin, store: state.Store) -> None:
        from mlcloud.spec import plan

        spec = self.watcher.spec
        movable = spec.recover.move_savings is not None and plan.priced(self.h.record.provider)
        first_step = self.watcher.steps_seen
        measured = self.adopted  # a job this watcher adopted started before it looked
        last, said = time.monotonic(), None
        while not self.stop.wait(POLL_S):
            if not measured and self.watcher.steps_seen != first_step:
                measured = True
                self._training(store)
            if not movable:
                if measured:
                    return
                continue
            if time.monotonic() - last < timeouts.seconds("MOVE_CHECK_EVERY"):
                continue
            last = time.monotonic()
            try:
                verdict = self._decide(store)
            except MlcloudError as e:  # the clouds cannot be asked now: the next check may
                if str(e) != said:
                    said = str(e)
                    store.event(self.h.record.name, "move", f"no move decided: {e}")
                continue
            if verdict is None:
                continue
            if not verdict[0].go:
                key = (verdict[1].place, verdict[1].fresh(time.time(), self._max_age()))
                if key != said:  # once per best place and freshness, not every check
                    said = key
                    store.event(self.h.record.name, "move", verdict[0].reason)
                continue
            self._move(twin, store, *verdict)
            return  # moved, or failed and said why: not tried again from this cluster

    def _training(self, store: state.Store) -> None:
        """The job makes progress on this cluster: how long it took since the cluster was
        asked for is the job's time to resume, for the next decision."""
        cur = self._row(store)
        if cur is not None and cur.uid == self.h.record.uid:
            store.event(
                cur.cluster,
                "training",
                f"managed job {self.watcher.name} training on {cur.cluster} "
                f"{time.time() - cur.started:.0f} s after it was asked for",
            )

    def _row(self, store: state.Store) -> state.ManagedCluster | None:
        job = store.get_managed(self.watcher.name)
        return next(
            (c for c in job.clusters if c.cluster == self.h.record.name) if job else (), None
        )

    def _resume_s(self, store: state.Store) -> float:
        """The job's newest measured time to resume (a `training` event), else the default."""
        job = store.get_managed(self.watcher.name)
        measured = [
            t - c.started
            for c in (job.clusters if job else ())
            if c.uid
            for t, kind, _, _ in store.event_log(c.cluster, c.uid)
            if kind == "training"
        ]
        return measured[-1] if measured else RESUME_DEFAULT_S

    def _uri(self, provider: str) -> str | None:
        return buckets.checkpoint_location(self.watcher.spec, provider, self.watcher.name)

    def _checkpoint(self) -> tuple[int, float] | None:
        """(step, when written) of the newest checkpoint in this cloud's bucket; None: none."""
        from mlcloud.jobs import checkpoint_copy

        uri = self._uri(self.h.record.provider)
        manifest = checkpoint_copy.manifest(uri) if uri else None
        if not manifest:
            return None
        return int(manifest.get("step", 0)), float(manifest.get("time") or 0.0)

    def _remaining(self) -> float | None:
        from mlcloud.control import agentview
        from mlcloud.parallel import fan_out

        now = time.time()
        probes = fan_out(
            lambda i: agentview.probe(self.h.transports[i], self.h.nodes[i].root, now),
            range(len(self.h.nodes)),
        )
        return agentview.job_remaining([p.samples for p in probes], self.job.job_id)

    def _decide(self, store: state.Store):
        """(Move, the best offer, the checkpoint at the decision), or None when this cluster
        has no offer to compare (not a priced cloud, or gone from the placements)."""
        from mlcloud.control.moves import decide_move

        spec = self.watcher.spec
        cur = self._row(store)
        if cur is None or cur.uid != self.h.record.uid:
            return None
        rec = self.h.record
        itype = (rec.spec.get("resources") or {}).get("instance_type")
        now, max_age = time.time(), self._max_age()
        found = live.offers(spec, spec.recover.placements, now=now, max_age=max_age)
        here = live.offer_at(found, rec.provider, cur.region, cur.zone or None, itype or "")
        if here is None:
            return None
        # a cloud with no checkpoint location of its own would start the job from scratch
        keeps = self._uri(rec.provider) is None
        allowed = [o for o in found if keeps or self._uri(o.provider) is not None]
        fresh = [o for o in allowed if o.fresh(now, max_age)]
        best = (fresh or allowed or [here])[0]
        cheapest = (allowed or [here])[0]
        ckpt = self._checkpoint()
        since = now - (ckpt[1] if ckpt else self.job.submitted)
        figures = dict(
            savings=spec.recover.move_savings,
            resume_s=self._resume_s(store),
            since_checkpoint_s=since,
            remaining_s=self._remaining(),
            nodes=len(self.h.nodes),
            now=now,
            max_age=max_age,
        )
        move = decide_move(here, best, **figures)
        if not move.go and cheapest != best:  # say why the cheapest place is no option
            return decide_move(here, cheapest, **figures), cheapest, ckpt
        return move, best, ckpt

    @staticmethod
    def _max_age() -> float:
        return timeouts.seconds("MOVE_PRICE_MAX_AGE")

    def _move(self, twin, store: state.Store, move, best: live.Offer, ckpt) -> bool:
        """Make the move; whether the job was stopped here for its new cluster."""
        name, here = self.watcher.name, self.h.record.name
        spec = self.watcher.spec
        job = store.get_managed(name)
        if job is None or job.status in state.JOB_DONE:
            return False
        if job.restarts >= spec.recover.max_restarts:
            store.event(here, "move", f"{move.reason}; recover.max_restarts ({job.restarts}) spent")
            return False
        max_cost, cost = spec.autoscale.max_cost, twin.spent()
        if max_cost is not None and cost + move.restart_cost >= max_cost:
            store.event(
                here,
                "move",
                f"{move.reason}; but ${cost:.2f} of ${max_cost:.2f} spent and the restart "
                f"costs ${move.restart_cost:.2f}: no move",
            )
            return False
        store.event(here, "move", f"{move.reason} (restart ${move.restart_cost:.2f})")
        if self._uri(self.h.record.provider) is not None:
            step = ckpt[0] if ckpt else -1
            if not self._fresh_checkpoint(store, step):
                return False
            again = self._decide(store)
            if again is None or not again[0].go:
                why = again[0].reason if again else f"{here} is not among the offers"
                store.event(here, "move", f"move called off: {why}")
                return False
            move, best, ckpt = again
        row = store.add_managed_cluster(name, best.provider, best.region, best.zone or "", None)
        old = replace(self._row(store), why=MOVED)
        try:
            made = twin.make_at(row, best, old, pin_zone=True)
        except MlcloudError as e:  # no capacity there among them
            store.update_managed_cluster(name, row.seq, ended=time.time(), why=f"move: {e}")
            store.event(here, "move", f"move to {best.place} abandoned: {e}; the job stays")
            if store.get_cluster(row.cluster) is not None:  # a failed first `up` left none
                twin._down(row.cluster)
            return False
        if made is None:  # cancelled meanwhile: make_at tore it down
            return False
        src, dst = self._uri(self.h.record.provider), self._uri(best.provider)
        if self.stop.is_set() or (src and dst and src != dst and not self._copy(store, src, dst)):
            why = "the job ended meanwhile" if self.stop.is_set() else "the copy failed"
            store.update_managed_cluster(name, made.seq, ended=time.time(), why=f"move: {why}")
            twin._down(made.cluster)
            return False
        store.event(  # a `recover` event with "(restart N of M)": the watcher counts it
            here,
            "recover",
            f"moved for price to {made.cluster} (restart {job.restarts + 1} of "
            f"{spec.recover.max_restarts}; ${cost:.2f} so far)",
        )
        self.moved = True  # before the stop: the driver's end is the move's
        for i in range(len(self.h.nodes)):
            try:
                launch.kill(self.h, i, self.job.job_id, 10.0, rule=("move", move.reason))
            except MlcloudError:
                pass  # a lost node: nothing to stop there
        return True

    def _fresh_checkpoint(self, store: state.Store, step: int) -> bool:
        """Wait for a checkpoint newer than `step` in the bucket (MOVE_CHECKPOINT_WAIT): the
        move loses no more than the time since it. False when the job ended meanwhile."""
        deadline = time.monotonic() + timeouts.seconds("MOVE_CHECKPOINT_WAIT")
        while time.monotonic() < deadline:
            got = self._checkpoint()
            if got is not None and got[0] > step:
                return True
            if self.stop.wait(POLL_S):
                return False
        store.event(
            self.h.record.name,
            "move",
            f"no checkpoint newer than step {step} within "
            f"{timeouts.seconds('MOVE_CHECKPOINT_WAIT'):.0f} s: deciding again",
        )
        return True

    def _copy(self, store: state.Store, src: str, dst: str) -> bool:
        from mlcloud.jobs import checkpoint_copy

        here = self.h.record.name
        try:
            copied = checkpoint_copy.copy_newest(src, dst)
        except checkpoint_copy.CheckpointCopyError as e:
            store.event(here, "move", f"move aborted: {e}; the job stays on {here}")
            return False
        if copied is not None:
            store.event(
                here,
                "move",
                f"checkpoint step {copied.step} copied from {src} to {dst} ({copied.size} "
                "bytes, verified)",
            )
        return True
