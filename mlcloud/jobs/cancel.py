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
            # a node that cannot be reached cannot tell its end: record the request anyway
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
