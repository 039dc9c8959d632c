"""Cancel a job: SIGTERM on every node (the template checkpoints), SIGKILL after a grace
period, CANCELLED recorded. Works whether a live driver follows the job (it records the end,
told by the nodes' `cancelled` mark) or none does (the nodes are read here)."""

from __future__ import annotations

import time

from mlcloud import state
from mlcloud.errors import MlcloudError
from mlcloud.jobs import launch, reconcile
from mlcloud.jobs.driver import STOP_WAIT
from mlcloud.parallel import fan_out
from mlcloud.provision.handle import find_job, open_cluster
from mlcloud.remote.shell import quote

GRACE = 30.0


def cancel(
    store: state.Store, name: str, job_id: int | None, grace: float = GRACE
) -> tuple[state.JobRecord, bool]:
    """(the job as recorded afterwards, whether it was still running to be cancelled)."""
    h = open_cluster(store, name)
    try:
        job = find_job(store, h, job_id)
        job = reconcile.reconcile(store, job, h)
        if job.status in state.JOB_DONE:
            return job, False
        # its follower (a suspended or slow `train`) may not have recorded an end the nodes
        # already hold: that end is the truth, not a cancel that came after it
        done = reconcile.ended(h, job.job_id)
        if done is not None:
            return _record(store, job, done), False
        unreachable: list[str] = []

        def one(i: int) -> None:
            jd = quote(launch.job_dir(h.nodes[i].root, job.job_id))
            prefix = quote(launch.node_tag(h, i, job.job_id))
            try:
                h.transports[i].run(f"{h.ctl(i)} cancel {jd} {prefix} {grace}", timeout=grace + 30)
            except MlcloudError as e:
                unreachable.append(str(e))  # the transport names the node

        fan_out(one, list(range(len(h.nodes))))
        deadline = time.monotonic() + STOP_WAIT
        while time.monotonic() < deadline:
            job = store.get_job(name, job.job_id, job.uid) or job
            if job.status in state.JOB_DONE:
                break
            if not reconcile.followed(job):
                job = reconcile.reconcile(store, job, h)
                break
            time.sleep(0.2)
        if job.status not in state.JOB_DONE:
            # its follower did not record the end in time: the nodes' exit codes (cancelled
            # where the cancel reached the job, the job's own where it had ended first); a
            # node that cannot be reached cannot tell its end: the request is recorded
            done = reconcile.ended(h, job.job_id)
            if done is not None:
                job = _record(store, job, done)
            else:
                store.update_job(
                    name, job.uid, job.job_id, status=state.JOB_CANCELLED, ended=time.time()
                )
                job = store.get_job(name, job.job_id, job.uid) or job
        if unreachable:
            raise MlcloudError(
                f"job {job.job_id} recorded CANCELLED, but {', '.join(unreachable)} could not "
                f"be reached: its part may still run there; `mlcloud down {name}` stops all"
            )
        return job, True
    finally:
        h.close()


def _record(store: state.Store, job: state.JobRecord, done) -> state.JobRecord:
    store.update_job(
        job.cluster,
        job.uid,
        job.job_id,
        status=done.status,
        exit_code=done.exit_code,
        ended=time.time(),
    )
    store.event(job.cluster, "job", f"job {job.job_id} {done.status} ({done.exit_code})")
    return store.get_job(job.cluster, job.job_id, job.uid) or job
