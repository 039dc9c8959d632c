"""Results come home: `mlcloud pull` copies each node's MLCLOUD_OUTPUT_DIR of a job (and, if
asked, its newest complete checkpoint) to DEST/node<i>/, in parallel, sending only what
changed since the last pull; `down` asks before deleting outputs nobody pulled.

What a node sends is checked by mlcloud/remote/fetch.py; this module picks the job, the
nodes and the places, and records each pull in state."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlcloud import state
from mlcloud.errors import MlcloudError, UsageError
from mlcloud.provision import handle
from mlcloud.remote.fetch import WRITING, Progress
from mlcloud.report import Reporter

DEFAULT_MAX_SIZE = 50 * 1024**3  # per node: past it a pull is a mistake to catch (--max-size)
SETTLE_S = 10.0  # an interrupted pull waits this long at most for its writers to unwind


@dataclass(frozen=True)
class NodePull:
    node: int
    dest: str
    files: int
    bytes: int
    unchanged: int
    skipped: tuple[str, ...]
    gone: tuple[str, ...]
    checkpoint: str | None


@dataclass(frozen=True)
class Pulled:
    cluster: str
    job_id: int
    dest: str
    nodes: tuple[NodePull, ...]
    checkpoints: bool = False  # asked for: a node without one is said


def default_dest(name: str, job_id: int) -> Path:
    return Path("mlcloud-results") / name / f"job-{job_id}"


def pull(
    store: state.Store,
    name: str,
    dest: Path | None = None,
    *,
    job_id: int | None = None,
    checkpoints: bool = False,
    node: int | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    report: Reporter,
    progress: Callable[[str], Progress] | None = None,
) -> Pulled:
    """Pull one job's outputs (default: the newest job) from every node, or node `node`.

    Nodes pulled whole are recorded even when another failed; then the first failure is
    raised (fan_out's rule)."""
    from mlcloud.jobs import launch
    from mlcloud.parallel import fan_out
    from mlcloud.remote.fetch import fetch

    h = handle.open_cluster(store, name)
    try:
        job = handle.find_job(store, h, job_id, ": nothing to pull")
        indices = list(range(len(h.nodes)))
        if node is not None:
            if node not in indices:
                raise UsageError(f"--node {node}: cluster {name} has nodes 0 to {len(h.nodes) - 1}")
            indices = [node]
        where = (dest or default_dest(name, job.job_id)).absolute()
        saved = launch.load_request(job)
        ckpt_rel = saved[0].checkpoint_dir if saved else h.record.spec.get("checkpoint_dir")
        # a line, not a step: a terminal shows the transfer as progress bars
        report.info(f"pulling job {job.job_id}'s outputs from {len(indices)} node(s) into {where}")

        def one(i: int) -> NodePull | MlcloudError:
            root, t = h.nodes[i].root, h.transports[i]
            request = {
                "output": launch.output_dir(root, job.job_id),
                "checkpoints": launch.checkpoint_dir(root, ckpt_rel) if checkpoints else None,
            }
            target = where / f"node{i}"
            try:
                got = fetch(t, request, target, max_size, progress(t.label) if progress else None)
            except MlcloudError as e:
                return e
            return NodePull(
                i,
                str(target),
                got.files,
                got.bytes,
                got.unchanged,
                got.skipped,
                got.gone,
                got.checkpoint,
            )

        try:
            results = fan_out(one, indices)
        except BaseException:
            # Ctrl-C: the workers stop at their next block and remove the file each was
            # writing; wait for that, or the process exits with temporaries left in DEST
            WRITING.settle(SETTLE_S)
            raise
        done = [r for r in results if isinstance(r, NodePull)]
        if done:
            store.record_pull(
                name,
                h.record.uid,
                job.job_id,
                str(where),
                {r.node: (r.files, r.bytes) for r in done},
            )
        failed = [r for r in results if isinstance(r, MlcloudError)]
        if failed:
            first = failed[0]
            if len(first.args) == 1:
                more = f" (and {len(failed) - 1} more node(s) failed)" if len(failed) > 1 else ""
                came = ", ".join(f"node{r.node}" for r in done)
                home = f"; {came} pulled into {where}" if done else ""
                first.args = (f"{first}{more}{home}",)
            raise first
        return Pulled(name, job.job_id, str(where), tuple(done), checkpoints)
    finally:
        h.close()


def unpulled(store: state.Store, name: str) -> int | None:
    """The newest job of the cluster if some node's outputs of it were not pulled since the
    job ended (from state alone: `down` must answer even when the nodes do not)."""
    rec = store.get_cluster(name)
    if rec is None:
        return None
    job = store.get_job(name, None, rec.uid)
    if job is None or _never_started(job):
        return None
    since = job.ended if job.ended is not None else job.submitted
    pulled = store.pulled_nodes(name, rec.uid, job.job_id, since)
    return None if set(range(len(rec.nodes))) <= pulled else job.job_id


def _never_started(job: state.JobRecord) -> bool:
    """A job that ended before anything ran (its workdir sync or setup failed, a `down` cut
    its start short) has no outputs: nothing to warn about. The request is saved just before
    the nodes start it (mlcloud/jobs/launch.py `start`)."""
    from mlcloud.jobs import launch

    return (
        job.status in (state.JOB_FAILED, state.JOB_CANCELLED)
        and job.exit_code is None
        and launch.load_request(job) is None
    )
