"""`autoscale --all`: a controller service for every cluster in the store.

Any number may run (a systemd unit per host, a Kubernetes Deployment, a CI cron with --once):
each cluster is led by one of them, elected by `state.lead` (an advisory lock on a shared
store, freed when its holder's connection ends). Every sweep, each service looks for UP
clusters nobody leads and takes them; a led cluster runs its controller (`Controller.run`) in
a thread of its own, on a store connection of its own, until the cluster is gone or the
service stops. So a dead leader's clusters are taken over within one sweep interval plus the
time the database takes to see its connection dead. The events a leader records name it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from mlcloud import state
from mlcloud.errors import MlcloudError
from mlcloud.report import Reporter


def me() -> str:
    """This controller, as its events name it."""
    return f"{state.whoami()} pid {os.getpid()}"


@dataclass
class _Led:
    release: Callable[[], None]
    stop: threading.Event
    thread: threading.Thread | None = None
    managed: bool = False  # a managed job's watcher: it ends with its job, not with `stop`


@dataclass
class Fleet:
    store: state.Store
    report: Reporter
    interval: float | None = None  # between passes of each cluster (default: its poll_seconds)
    every: float = 10.0  # between sweeps for clusters nobody leads
    led: dict[str, _Led] = field(default_factory=dict)

    def sweep(self, once: bool = False) -> list[str]:
        """Take the lead of every UP cluster nobody leads; let go of those whose controller
        ended (the cluster gone or stopped). once: one pass each, here, then let go. Returns
        the clusters this sweep took."""
        for name, led in list(self.led.items()):
            if led.thread is not None and not led.thread.is_alive():
                led.release()
                del self.led[name]
        taken = []
        watched = {
            c.cluster
            for j in self.store.list_managed()
            if j.status not in state.JOB_DONE
            for c in j.clusters
        }
        for rec in self.store.list_clusters():
            if rec.status != state.UP or rec.name in self.led or rec.name in watched:
                continue  # a managed job's cluster: its watcher's driver runs its controller
            release = state.lead(rec.name)
            if release is None:
                continue  # another controller leads it
            led = _Led(release, threading.Event())
            self.led[rec.name] = led
            taken.append(rec.name)
            if once:
                try:
                    self._lead(rec.name, led.stop, once=True)
                finally:
                    release()
                    del self.led[rec.name]
                continue
            led.thread = threading.Thread(
                target=self._lead, args=(rec.name, led.stop), name=f"lead-{rec.name}", daemon=True
            )
            led.thread.start()
        if not once:
            taken += self._managed()
        return taken

    def _managed(self) -> list[str]:
        """Watch every managed job handed to this service (`launch --detach`) nobody
        watches: each one's ladder in a thread of its own (mlcloud/control/managed.py)."""
        from mlcloud.control import managed

        taken = []
        for job in self.store.list_managed():
            key = managed.lead_key(job.name)
            if job.status in state.JOB_DONE or job.watcher != managed.DETACHED or key in self.led:
                continue
            release = state.lead(key)
            if release is None:
                continue  # another service watches it
            led = _Led(release, threading.Event(), managed=True)
            led.thread = threading.Thread(
                target=self._watch, args=(job.name,), name=f"watch-{job.name}", daemon=True
            )
            self.led[key] = led
            taken.append(job.name)
            led.thread.start()
        return taken

    def _watch(self, name: str) -> None:
        from mlcloud.control import managed

        store = self.store.reopen()
        try:
            managed.watch_detached(store, name, self.report)
        except MlcloudError as e:
            self.report.warn(f"managed job {name}: {e}")
        finally:
            store.close()

    def run(self, stop: threading.Event) -> None:
        """Sweep every `every` s until stop is set; then stop every led controller and let
        go of its lead."""
        try:
            while not stop.is_set():
                try:
                    self.sweep()
                except MlcloudError as e:  # the database gone: the nodes' dead-man switches
                    self.report.warn(f"autoscale --all: {e}; trying again in {self.every:g}s")
                stop.wait(self.every)
        finally:
            for led in self.led.values():
                led.stop.set()
            for led in self.led.values():
                if led.thread is not None and not led.managed:  # a watcher ends with its job;
                    led.thread.join(60)  # the next service resumes it
                led.release()
            self.led.clear()

    def _lead(self, name: str, stop: threading.Event, once: bool = False) -> None:
        """The cluster's controller, on a store connection of this thread's own."""
        from mlcloud.control import nodeevents
        from mlcloud.control.controller import Controller
        from mlcloud.provision import handle

        store = self.store.reopen()
        try:
            h = handle.open_cluster(store, name)
            try:
                nodeevents.gather(store, h)
                ctl = Controller(store, h, self.report, by=me())
                ctl._event("leader", f"{name} is led by this controller")
                if once:
                    ctl.step()
                    if not ctl.gone:
                        ctl.detach()
                else:
                    ctl.run(self.interval, stop)
            finally:
                h.close()
        except MlcloudError as e:
            self.report.warn(f"autoscale {name}: {e}")
        finally:
            store.close()
