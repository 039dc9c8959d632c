"""Start a job on every node of a cluster: sync the code, run setup once, start torchrun.

What runs on a node is described by a job.json (argv, cwd, env; written 0600 over the
transport), never by interpolating values into a shell line, so secrets stay out of argv and
logs and no value can inject a command.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from mlcloud import state
from mlcloud.cluster import Handle
from mlcloud.errors import UsageError
from mlcloud.parallel import fan_out
from mlcloud.remote.layout import CTL, tag
from mlcloud.remote.sync import Limits, check_workdir
from mlcloud.remote.transport import check
from mlcloud.report import Reporter

MAX_RESTARTS = 0


@dataclass(frozen=True)
class JobRequest:
    workdir: Path
    script: str
    args: tuple[str, ...]
    nproc_per_node: int | None
    envs: dict[str, str]
    setup: str | None
    checkpoint_dir: str | None
    limits: Limits = Limits()


def job_dir(root: str, job_id: int) -> str:
    return f"{root}/jobs/{job_id}"


def validate(req: JobRequest) -> None:
    if not req.workdir.is_dir():
        raise UsageError(f"workdir {req.workdir} is not a directory")
    script = Path(req.script)
    if script.is_absolute() or ".." in script.parts:
        raise UsageError(
            f"script {req.script!r} must be a path inside the workdir {req.workdir}, relative to it"
        )
    if not (req.workdir / script).is_file():
        raise UsageError(
            f"script {req.script!r} not found in workdir {req.workdir} "
            "(set --workdir or train.script)"
        )
    check_workdir(req.workdir, req.limits)  # before a job exists or a byte travels


def nproc_for(h: Handle, requested: int | None) -> int:
    """Processes per node: as asked, else one per GPU, else one."""
    if requested:
        return requested
    gpus = min((n.gpus for n in h.nodes), default=0)
    return gpus or 1


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def node_job(h: Handle, req: JobRequest, job_id: int, i: int, port: int, nproc: int) -> dict:
    """job.json for node i: the torchrun command and the job's environment (README, "The
    job's environment")."""
    nodes = h.nodes
    node, head = nodes[i], nodes[0]
    # inside the node's directory: the spec refuses absolute paths and `..`
    ckpt = f"{node.root}/{req.checkpoint_dir or 'checkpoints'}"
    # torchrun would set this anyway (with a banner) when running several processes per node.
    env = {"OMP_NUM_THREADS": "1", **req.envs}
    env.update(
        {
            "MLCLOUD_CLUSTER": h.record.name,
            "MLCLOUD_JOB_ID": str(job_id),
            "MLCLOUD_NODE_RANK": str(i),
            "MLCLOUD_NUM_NODES": str(len(nodes)),
            "MLCLOUD_NODE_IPS": "\n".join(n.private_ip for n in nodes),
            "MLCLOUD_HEAD_IP": head.private_ip,
            "MLCLOUD_NODE_IP": node.private_ip,
            "MLCLOUD_GPUS_PER_NODE": str(node.gpus),
            "MLCLOUD_CHECKPOINT_DIR": ckpt,
        }
    )
    # node_ctl runs torchrun in its own process: the rendezvous store binds to the node's
    # address, and the first failing rank's exit code becomes the job's
    argv = [
        h.transports[i].python,
        f"{node.root}/{CTL}",
        "torchrun",
        f"--nnodes={len(nodes)}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={_host(head.private_ip)}:{port}",
        f"--rdzv-id={h.record.uid}-{job_id}",
        # torch decides "am I the store host?" from the hostname; say it outright (in a network
        # namespace the hostname resolves to loopback)
        f"--rdzv-conf=is_host={'true' if i == 0 else 'false'}",
        f"--local-addr={node.private_ip}",
        f"--max-restarts={MAX_RESTARTS}",
        req.script,
        *req.args,
    ]
    return {
        "argv": argv,
        "cwd": f"{node.root}/workdir",
        "env": env,
        "tag": tag(h.record.uid, i, job_id),
        "checkpoint_dir": ckpt,
    }


def setup_hash(req: JobRequest) -> str | None:
    """Setup reruns only when its text or the workdir's requirements change."""
    if not req.setup:
        return None
    h = hashlib.sha256(req.setup.encode())
    for name in ("requirements.txt", "pyproject.toml", "environment.yml"):
        f = req.workdir / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def start(
    store: state.Store, h: Handle, req: JobRequest, job: state.JobRecord, report: Reporter, emit
) -> int:
    """Sync, set up and start the job on all nodes. The caller holds the cluster lock."""
    n = len(h.nodes)
    report.step(f"syncing {req.workdir} to {n} node(s)")
    stats = fan_out(
        lambda i: h.transports[i].sync(req.workdir, f"{h.nodes[i].root}/workdir"), list(range(n))
    )
    sent = sum(s.files_sent for s in stats)
    report.info(
        f"synced: {sent} file(s), {sum(s.bytes_sent for s in stats) / 1e6:.1f} MB sent, "
        f"{sum(s.files_deleted for s in stats)} deleted"
    )
    digest = setup_hash(req)
    if digest:
        report.step("running setup (once per node per distinct setup)")
        fan_out(lambda i: _setup(h, i, req.setup or "", digest, emit), list(range(n)))
    nproc = nproc_for(h, req.nproc_per_node)
    port = int(
        check(
            h.transports[0].run(f"{h.ctl(0)} freeport"), h.transports[0], "finding a free port"
        ).stdout.split()[-1]
    )

    def launch(i: int) -> None:
        t = h.transports[i]
        jd = job_dir(h.nodes[i].root, job.job_id)
        spec = node_job(h, req, job.job_id, i, port, nproc)
        check(
            t.run(f"mkdir -p {shlex.quote(jd)} {shlex.quote(spec['checkpoint_dir'])}"),
            t,
            "creating the job directory",
        )
        t.put(json.dumps(spec).encode(), f"{jd}/job.json", mode=0o600)
        check(t.run(f"{h.ctl(i)} start {shlex.quote(jd)}"), t, "starting the job")

    report.step(f"starting job {job.job_id}: {n} node(s) x {nproc} process(es)")
    fan_out(launch, list(range(n)))
    store.update_job(h.record.name, job.uid, job.job_id, status=state.JOB_RUNNING)
    store.event(h.record.name, "job", f"job {job.job_id} started: {n} x {nproc} {req.script}")
    return nproc


def _setup(h: Handle, i: int, setup: str, digest: str, emit) -> None:
    """Run setup once per node per digest. The script goes as a file: in argv, one over
    128 KiB fails with "Argument list too long"."""
    t, root = h.transports[i], h.nodes[i].root
    marker = shlex.quote(f"{root}/setup/{digest}.done")
    script = f"{root}/setup/{digest}.sh"
    if t.run(f"test -e {marker}").exit_code == 0:
        return
    check(t.run(f"mkdir -p {shlex.quote(root + '/setup')}"), t, "setup")
    t.put(setup.encode(), script, mode=0o600)
    cmd = (
        f"cd {shlex.quote(root + '/workdir')} && bash {shlex.quote(script)} 2>&1 && touch {marker}"
    )
    result = t.run(cmd, on_line=lambda line: emit(i, line))
    check(result, t, "setup")


def kill(h: Handle, i: int, job_id: int, grace: float) -> None:
    """Stop node i's part of a job: SIGTERM (the template checkpoints), SIGKILL after grace."""
    t = h.transports[i]
    t.run(
        f"{h.ctl(i)} kill {shlex.quote(tag(h.record.uid, i, job_id))} {grace}", timeout=grace + 30
    )  # a node that stopped answering must not hold the caller
