"""The nodes are where a job's truth lives; local state is a cache of it.

A job that no live mlcloud process follows (its `train` was killed, its detached driver died,
its end could not be written) is brought in line with its nodes here: whether it still runs,
how it ended (node_ctl's exit_code and failure.json), and its whole output (each node's
output.log rebuilds the local log). `status`, `logs`, `train` and `cancel` call this.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mlcloud import state
from mlcloud.errors import MlcloudError
from mlcloud.jobs import launch, outcome
from mlcloud.jobs.outcome import NodeEnd
from mlcloud.parallel import fan_out
from mlcloud.provision.handle import Handle, open_cluster
from mlcloud.remote.shell import quote
from mlcloud.state import paths

UNREACHABLE = "unreachable"


def followed(job: state.JobRecord) -> bool:
    """Whether a live mlcloud process of this machine follows the job (and will record its end)."""
    return job.driver_pid is not None and state.pid_alive(job.driver_pid)


def needs_nodes(job: state.JobRecord) -> bool:
    return job.status not in state.JOB_DONE and not followed(job)


def probe(h: Handle, job_id: int) -> list[dict]:
    """node_ctl's summary of the job on every node; a node that cannot be asked is UNREACHABLE."""

    def one(i: int) -> dict:
        jd = launch.job_dir(h.nodes[i].root, job_id)
        try:
            r = h.transports[i].run(f"{h.ctl(i)} probe {quote(jd)}", timeout=60)
            if r.exit_code == 0:
                return json.loads(r.stdout.strip().splitlines()[-1])
        except (MlcloudError, ValueError, IndexError):
            pass
        return {"state": UNREACHABLE}

    return fan_out(one, list(range(len(h.nodes))))


def ended(h: Handle, job_id: int) -> outcome.Outcome | None:
    """How the job ended, read from its nodes' exit codes, when it has ended on every node
    (None while a node runs it, never started it or cannot be asked): whatever a local
    follower, perhaps suspended or slow, has yet to record."""
    nodes = probe(h, job_id)
    if any(n["state"] not in ("ended", "killed") for n in nodes):
        return None
    ends = {
        i: NodeEnd(
            int(n["exit_code"]), n.get("failure"), bool(n.get("cancelled")), n.get("stopped")
        )
        for i, n in enumerate(nodes)
    }
    order = sorted(ends, key=lambda i: (nodes[i].get("ended_at") or 0.0, i))
    return outcome.decide(job_id, ends, order)


def rebuild_log(h: Handle, job: state.JobRecord, notes: list[str]) -> None:
    """Write the job's local log afresh from every node's output.log (node by node), then
    mlcloud's notes. Nodes that cannot be read keep nothing of the old log: say so."""
    parts = []
    for i, t in enumerate(h.transports):
        try:
            data = t.get(f"{launch.job_dir(h.nodes[i].root, job.job_id)}/output.log")
        except MlcloudError as e:
            parts.append(f"[mlcloud] node{i}: output not readable: {e}\n")
            continue
        text = (data or b"").decode(errors="replace")
        parts.extend(f"[node{i}] {line}\n" for line in text.splitlines())
    parts.extend(f"[mlcloud] {n}\n" for n in notes)
    # the nodes hold the whole output: a log directory removed meanwhile is made again
    paths.private_dir(Path(job.log_path).parent)
    tmp = f"{job.log_path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(parts)
    os.replace(tmp, job.log_path)


def reconcile(store: state.Store, job: state.JobRecord, h: Handle | None = None) -> state.JobRecord:
    """The job as its nodes tell it, recorded; a followed or finished job is returned as is.

    A job whose nodes cannot be reached is left as recorded (its `followed` says why)."""
    if not needs_nodes(job):
        return job
    rec = store.get_cluster(job.cluster)
    if rec is None or rec.uid != job.uid:
        if os.path.isdir(os.path.dirname(job.log_path)):  # else `logs` says the log is gone
            with open(job.log_path, "a") as f:
                f.write(
                    f"[mlcloud] job {job.job_id}: its cluster went down before its end was seen\n"
                )
        return _record(store, job, state.JOB_FAILED, None)
    if rec.status != state.UP:
        return job
    own = h is None
    if h is None:
        try:
            h = open_cluster(store, job.cluster)
        except MlcloudError:
            return job
    try:
        return _reconcile(store, job, h)
    finally:
        if own:
            h.close()


def _reconcile(store: state.Store, job: state.JobRecord, h: Handle) -> state.JobRecord:
    nodes = probe(h, job.job_id)
    states = [n["state"] for n in nodes]
    if UNREACHABLE in states:
        return job
    cancelled = any(n.get("cancelled") for n in nodes)
    if "not started" in states:
        # its starter went away before every node had it: it can never rendezvous
        missing = ", ".join(f"node{i}" for i, s in enumerate(states) if s == "not started")
        if "running" in states:
            fan_out(lambda i: launch.kill(h, i, job.job_id, grace=5.0), list(range(len(h.nodes))))
        reason = (
            f"job {job.job_id} never started on {missing}: the mlcloud process starting it "
            "went away (or it was cancelled); nothing of it runs now"
        )
        rebuild_log(h, job, [reason])
        status = state.JOB_CANCELLED if cancelled else state.JOB_FAILED
        return _record(store, job, status, None)
    if "running" in states:
        rebuild_log(h, job, [])
        if job.status == state.JOB_STARTING:
            store.update_job(job.cluster, job.uid, job.job_id, status=state.JOB_RUNNING)
        return _get(store, job)
    ends = {
        i: NodeEnd(
            int(n["exit_code"]), n.get("failure"), bool(n.get("cancelled")), n.get("stopped")
        )
        for i, n in enumerate(nodes)
    }
    order = sorted(ends, key=lambda i: (nodes[i].get("ended_at") or 0.0, i))
    result = outcome.decide(job.job_id, ends, order)
    rebuild_log(h, job, [result.line + " (read from the nodes)"])
    # when it ended on the nodes, not when this looked (a pull made in between counts)
    ended = min(max((float(n.get("ended_at") or 0.0) for n in nodes), default=0.0), time.time())
    return _record(store, job, result.status, result.exit_code, ended or None)


def _record(
    store: state.Store,
    job: state.JobRecord,
    status: str,
    code: int | None,
    ended: float | None = None,
) -> state.JobRecord:
    store.update_job(
        job.cluster, job.uid, job.job_id, status=status, exit_code=code, ended=ended or time.time()
    )
    store.event(job.cluster, "job", f"job {job.job_id} {status} ({code}), read from the nodes")
    return _get(store, job)


def _get(store: state.Store, job: state.JobRecord) -> state.JobRecord:
    return store.get_job(job.cluster, job.job_id, job.uid) or job
