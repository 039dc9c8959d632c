"""Start a job on every node of a cluster: sync the code, run setup once, start torchrun.

What runs on a node is described by a job.json (argv, cwd, env; written 0600 over the
transport), never by interpolating values into a shell line, so secrets stay out of argv and
logs and no value can inject a command.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mlcloud import state
from mlcloud.errors import MlcloudError, UsageError
from mlcloud.parallel import fan_out
from mlcloud.provision.handle import Handle
from mlcloud.remote.shell import CTL, node_number, quote, tag
from mlcloud.remote.sync import Limits, check_workdir
from mlcloud.remote.transport import RemoteError, check
from mlcloud.report import Reporter
from mlcloud.spec.buckets import checkpoint_location

MAX_RESTARTS = 0
# An elastic job restarts its workers at every membership change (a node lost, one joining).
ELASTIC_RESTARTS = 10
# How long the rendezvous waits for more nodes once MIN are there (torch's default is 30 s).
LAST_CALL_S = 5


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


def output_dir(root: str, job_id: int) -> str:
    """MLCLOUD_OUTPUT_DIR: what the job leaves for `mlcloud pull`, one per node per job."""
    return f"{job_dir(root, job_id)}/outputs"


def progress_file(root: str, job_id: int) -> str:
    """MLCLOUD_PROGRESS_FILE: where the job may say how far it is, as JSON
    {"done": N, "total": M} (README, "What the job sees"); the node agent reads it into its
    samples and the controller estimates the job's remaining time from them. One per node per
    job."""
    return f"{job_dir(root, job_id)}/progress"


def checkpoint_dir(root: str, relative: str | None) -> str:
    """MLCLOUD_CHECKPOINT_DIR: inside the node's directory (the spec refuses absolute paths
    and `..`), shared by the cluster's jobs so a job resumes from the last one's."""
    return f"{root}/{relative or 'checkpoints'}"


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


def node_tag(h: Handle, i: int, job_id: int | None = None) -> str:
    """The process tag of node i: numbered like its directory (`node-K`), as the providers
    number it when they stop its processes; a spare that replaced node i keeps its own K."""
    k = node_number(h.nodes[i].root)
    return tag(h.record.uid, i if k is None else k, job_id)


def elastic_range(h: Handle) -> tuple[int, int] | None:
    """(MIN, MAX) when the cluster was made with `--nodes MIN:MAX`, else None."""
    from mlcloud.spec.task import parse_nodes

    nodes = h.record.spec.get("nodes")
    if not isinstance(nodes, str):
        return None
    low, high = parse_nodes(nodes)
    return None if low is None else (low, high)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def node_job(
    h: Handle, req: JobRequest, job_id: int, i: int, port: int, nproc: int, rdzv: int = 0
) -> dict:
    """job.json for node i: the torchrun command and the job's environment (README, "The
    job's environment"). rdzv numbers the job's rendezvous: a restart with a new head makes a
    new one."""
    nodes = h.nodes
    node, head = nodes[i], nodes[0]
    ckpt = checkpoint_dir(node.root, req.checkpoint_dir)
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
            "MLCLOUD_OUTPUT_DIR": output_dir(node.root, job_id),
            "MLCLOUD_PROGRESS_FILE": progress_file(node.root, job_id),
        }
    )
    bucket = checkpoint_location(h.record.spec, h.record.provider, h.record.name)
    if bucket:
        env["MLCLOUD_CHECKPOINT_URI"] = bucket
    # torch decides "am I the store host?" from the hostname; say it outright (in a network
    # namespace the hostname resolves to loopback)
    rdzv_conf = f"is_host={'true' if i == 0 else 'false'}"
    elastic = elastic_range(h)
    if elastic:
        nnodes, restarts = f"{elastic[0]}:{elastic[1]}", ELASTIC_RESTARTS
        rdzv_conf += f",last_call_timeout={LAST_CALL_S}"
        # with one store shared by rendezvous and workers, the restart after a lost node
        # can fail on a stale port or hang
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    else:
        nnodes, restarts = str(len(nodes)), MAX_RESTARTS
    # node_ctl runs torchrun in its own process: the rendezvous store binds to the node's
    # address, and the first failing rank's exit code becomes the job's
    argv = [
        h.transports[i].python,
        f"{node.root}/{CTL}",
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={_host(head.private_ip)}:{port}",
        f"--rdzv-id={h.record.uid}-{job_id}-{rdzv}",
        f"--rdzv-conf={rdzv_conf}",
        f"--local-addr={node.private_ip}",
        f"--max-restarts={restarts}",
        req.script,
        *req.args,
    ]
    return {
        "argv": argv,
        "cwd": f"{node.root}/workdir",
        "env": env,
        # an elastic job's tag names its rendezvous too: after a restart, what the first run
        # left behind (its reaper) cannot take the new run's processes for its own
        "tag": node_tag(h, i, job_id) + (f"r{rdzv}." if elastic else ""),
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
    prepare_nodes(h, req, list(range(n)), report, emit)
    nproc = nproc_for(h, req.nproc_per_node)
    port = free_port(h)
    save_request(job, req, Rendezvous(port, 0, nproc))
    report.step(f"starting job {job.job_id}: {n} node(s) x {nproc} process(es)")
    launch_on(h, req, job.job_id, list(range(n)), Rendezvous(port, 0, nproc))
    store.update_job(h.record.name, job.uid, job.job_id, status=state.JOB_RUNNING)
    store.event(h.record.name, "job", f"job {job.job_id} started: {n} x {nproc} {req.script}")
    return nproc


@dataclass(frozen=True)
class Rendezvous:
    """Where a job's nodes meet: the head's port, the rendezvous' number (a new head makes a
    new one) and processes per node. Saved with the job, so a node that joins later meets
    the others."""

    port: int
    number: int
    nproc: int


def prepare_nodes(h: Handle, req: JobRequest, nodes: list[int], report: Reporter, emit) -> None:
    """Sync the workdir to these nodes and run setup there: for a new job, and for a node
    that joins one (a replacement)."""
    from mlcloud.remote.fanout import Target, sync_nodes

    report.step(f"syncing {req.workdir} to {len(nodes)} node(s)")
    targets = [Target(h.transports[i], h.nodes[i].root) for i in nodes]
    stats = sync_nodes(targets, req.workdir, h.record.uid, report.info)
    sent = sum(s.files_sent for s in stats)
    relayed = sum(s.relayed for s in stats)
    report.info(
        f"synced: {sent} file(s), {sum(s.files_deleted for s in stats)} deleted, "
        f"{sum(s.bytes_sent for s in stats if not s.relayed) / 1e6:.1f} MB sent from here"
        + (f" ({relayed} node(s) served by a peer)" if relayed else "")
    )
    digest = setup_hash(req)
    if digest:
        report.step("running setup (once per node per distinct setup)")
        fan_out(lambda i: _setup(h, i, req.setup or "", digest, emit), nodes)


def free_port(h: Handle) -> int:
    """A free port on the head (node 0) for the rendezvous."""
    t = h.transports[0]
    return int(check(t.run(f"{h.ctl(0)} freeport"), t, "finding a free port").stdout.split()[-1])


def launch_on(h: Handle, req: JobRequest, job_id: int, nodes: list[int], rdzv: Rendezvous) -> None:
    """Write each node's job.json and start its part of the job."""

    def launch(i: int) -> None:
        t = h.transports[i]
        jd = job_dir(h.nodes[i].root, job_id)
        spec = node_job(h, req, job_id, i, rdzv.port, rdzv.nproc, rdzv.number)
        check(
            t.run(
                f"mkdir -p {quote(jd)} {quote(spec['checkpoint_dir'])} "
                f"{quote(output_dir(h.nodes[i].root, job_id))}"
            ),
            t,
            "creating the job directory",
        )
        t.put(json.dumps(spec).encode(), f"{jd}/job.json", mode=0o600)
        check(t.run(f"{h.ctl(i)} start {quote(jd)}"), t, "starting the job")

    fan_out(launch, nodes)


def _request_path(job: state.JobRecord) -> Path:
    return Path(job.log_path + ".request.json")


def save_request(job: state.JobRecord, req: JobRequest, rdzv: Rendezvous) -> None:
    """Keep what started the job (0600, next to its log): recovery starts the same job on a
    replacement node without the command line that made it. The environment's names only:
    its values (`--env` secrets among them) stay on the nodes (`job_env` reads them back)."""
    from mlcloud.state import atomic

    data = {
        "workdir": str(req.workdir),
        "script": req.script,
        "args": list(req.args),
        "nproc_per_node": req.nproc_per_node,
        "env_names": sorted(req.envs),
        "setup": req.setup,
        "checkpoint_dir": req.checkpoint_dir,
        "rendezvous": {"port": rdzv.port, "number": rdzv.number, "nproc": rdzv.nproc},
    }
    atomic.write(_request_path(job), json.dumps(data).encode())


def load_request(job: state.JobRecord) -> tuple[JobRequest, Rendezvous] | None:
    """The saved request and rendezvous of a job, or None (started by an older mlcloud). Its
    `envs` map each name to "": fill them with `job_env` before starting it anywhere."""
    try:
        d = json.loads(_request_path(job).read_text())
    except (OSError, ValueError):
        return None
    req = JobRequest(
        workdir=Path(d["workdir"]),
        script=d["script"],
        args=tuple(d["args"]),
        nproc_per_node=d["nproc_per_node"],
        envs=dict.fromkeys(d["env_names"], ""),
        setup=d["setup"],
        checkpoint_dir=d["checkpoint_dir"],
    )
    return req, Rendezvous(**d["rendezvous"])


def job_env(h: Handle, job_id: int, names: list[str], nodes: list[int]) -> dict[str, str]:
    """The values of a running job's environment, read back from the first of `nodes` whose
    job.json answers (0600 there; never kept here), else from this process's environment (a
    controller that was given them). One line naming what is missing when neither has it."""
    if not names:
        return {}
    for i in nodes:
        try:
            raw = h.transports[i].get(f"{job_dir(h.nodes[i].root, job_id)}/job.json")
            env = json.loads(raw)["env"] if raw else None
        except (RemoteError, ValueError, KeyError, TypeError):
            continue
        if isinstance(env, dict) and all(n in env for n in names):
            return {n: str(env[n]) for n in names}
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise MlcloudError(
            f"job {job_id}: no node left holds its environment ({', '.join(missing)}); "
            "set those variables where the controller runs, or start the job again"
        )
    return {n: os.environ[n] for n in names}


def _setup(h: Handle, i: int, setup: str, digest: str, emit) -> None:
    """Run setup once per node per digest. The script goes as a file: in argv, one over
    128 KiB fails with "Argument list too long"."""
    t, root = h.transports[i], h.nodes[i].root
    marker = quote(f"{root}/setup/{digest}.done")
    script = f"{root}/setup/{digest}.sh"
    if t.run(f"test -e {marker}").exit_code == 0:
        return
    check(t.run(f"mkdir -p {quote(root + '/setup')}"), t, "setup")
    t.put(setup.encode(), script, mode=0o600)
    cmd = f"cd {quote(root + '/workdir')} && bash {quote(script)} 2>&1 && touch {marker}"
    result = t.run(cmd, on_line=lambda line: emit(i, line))
    check(result, t, "setup")


def kill(
    h: Handle,
    i: int,
    job_id: int,
    grace: float,
    cancelled: bool = False,
    rule: tuple[str, str] | None = None,
) -> None:
    """Stop node i's part of a job: SIGTERM (the template checkpoints), SIGKILL after grace.
    cancelled: the user stopped it (Ctrl-C); rule: (kind, reason) of the rule that stops it
    (stall, budget, idle). Either is marked on the node, which tells it with the job's end to
    whoever reads it (a job that already ended there keeps its own end)."""
    t = h.transports[i]
    tag = quote(node_tag(h, i, job_id))
    jd = quote(job_dir(h.nodes[i].root, job_id))
    if cancelled:
        what = f"cancel {jd} {tag} {grace}"
    elif rule is not None:
        what = f"stop {jd} {tag} {grace} {quote(rule[0])} {quote(rule[1])}"
    else:
        what = f"kill {tag} {grace}"
    # a node that stopped answering must not hold the caller
    t.run(f"{h.ctl(i)} {what}", timeout=grace + 30)
