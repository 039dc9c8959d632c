"""`train`, `logs`, `exec`: running things on a cluster's nodes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer
from mlcloud.cli import options, output
from mlcloud.cli.cluster import load


def train(
    name: str = typer.Argument(..., help="Cluster to run on."),
    script: str | None = typer.Argument(
        None, help="Script inside the workdir (default: train.script); its arguments follow."
    ),
    script_args: list[str] | None = typer.Argument(None, help="Arguments for the script."),
    file: Path | None = options.SPEC_FILE,
    workdir: Path | None = typer.Option(
        None,
        "--workdir",
        "-w",
        help="Directory shipped to every node (default: spec's, else .).",
        file_okay=False,
    ),
    nproc_per_node: int | None = typer.Option(
        None, "--nproc-per-node", min=1, help="Processes per node (default: one per GPU, else 1)."
    ),
    env: list[str] | None = typer.Option(
        None, "--env", "-e", help="KEY=VALUE for the job; repeatable. Sent in a 0600 file."
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once the job has started."),
    down: bool = typer.Option(
        False, "--down", help="Tear the cluster down after the job, even if it fails."
    ),
) -> None:
    """Ship the workdir and run SCRIPT with torchrun on every node (rendezvous at the head).

    Put the script's own options after `--`: mlcloud train demo train.py -- --steps 500"""
    from mlcloud import cluster, launch, paths, state
    from mlcloud.driver import Driver
    from mlcloud.errors import UsageError
    from mlcloud.locks import cluster_lock
    from mlcloud.remote.sync import Limits
    from mlcloud.spec import parse_env

    spec = load(file, workdir=str(workdir.resolve()) if workdir else None)
    if script and script.startswith("-"):  # `train NAME -f spec -- --steps 5`: args only
        script_args, script = [script, *(script_args or [])], None
    script = script or spec.train.script
    if not script:
        raise UsageError(
            "name the script to run: `mlcloud train NAME train.py` or train.script in the spec file"
        )
    args = (
        tuple(script_args or ())
        if (script_args or script != spec.train.script)
        else spec.train.args
    )
    req = launch.JobRequest(
        workdir=cluster.workdir_of(spec),
        script=script,
        args=args,
        nproc_per_node=nproc_per_node or spec.train.nproc_per_node,
        envs={**spec.envs, **parse_env(env or [])},
        setup=spec.setup,
        checkpoint_dir=spec.checkpoint_dir,
        limits=Limits.of(spec.max_workdir_files, spec.max_workdir_size),
    )
    launch.validate(req)
    store = state.open_store()
    h = cluster.open_cluster(store, name)
    rep = output.reporter()
    driver = None
    code = 1
    try:
        with cluster_lock(name):
            nproc = launch.nproc_for(h, req.nproc_per_node)
            job = store.new_job(
                name,
                h.record.uid,
                shlex.join([script, *args]),
                len(h.nodes),
                nproc,
                paths.logs_dir(name),
            )
            driver = Driver(store, h, job, _printer())
            try:
                launch.start(store, h, req, job, rep, driver.emit)
            except BaseException:
                store.update_job(
                    name, job.uid, job.job_id, status=state.JOB_FAILED, ended=time.time()
                )
                driver.log.close()
                _stop_quietly(h, job.job_id)  # whatever did start must not keep running
                raise
        output.close(rep)
        if detach:
            driver.log.close()
            pid = _spawn_driver(name, job, down)
            store.update_job(name, job.uid, job.job_id, driver_pid=pid)
            print(
                f"job {job.job_id} started on {name}: `mlcloud logs {name} --follow` to watch"
                + (" (the cluster goes down when it ends)" if down else "")
            )
            return
        store.update_job(name, job.uid, job.job_id, driver_pid=os.getpid())
        try:
            code = driver.run()
        except KeyboardInterrupt:
            code = 130
    finally:
        output.close(rep)
        h.close()
        if down and not detach:
            rep = output.reporter()
            try:
                cluster.down(store, name, rep)
                rep.info(f"cluster {name} is down")
            finally:
                output.close(rep)
    raise typer.Exit(code)


def _stop_quietly(h, job_id: int) -> None:
    """Stop a job that failed to start on every node, without hiding why it failed."""
    from mlcloud import launch
    from mlcloud.errors import MlcloudError
    from mlcloud.parallel import fan_out

    def one(i: int) -> None:
        try:
            launch.kill(h, i, job_id, grace=5.0)
        except MlcloudError as e:
            print(f"warning: {e}", file=sys.stderr)

    fan_out(one, list(range(len(h.nodes))))


def _printer():
    lock = threading.Lock()

    def sink(line: str) -> None:
        with lock:
            print(line, flush=True)

    return sink


def _spawn_driver(name: str, job, down: bool) -> int:
    log = open(job.log_path + ".driver", "ab")  # noqa: SIM115 (handed to the child)
    argv = [sys.executable, "-m", "mlcloud.driver", name, str(job.job_id)]
    proc = subprocess.Popen(
        argv + (["--down"] if down else []),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    log.close()
    return proc.pid


def logs(
    name: str = typer.Argument(..., help="Cluster."),
    job: int | None = typer.Option(None, "--job", "-j", help="Job id (default: the latest)."),
    follow: bool = typer.Option(False, "--follow", "-F", help="Keep printing until the job ends."),
) -> None:
    """Print a job's node-prefixed output; with --follow, exit with the job's exit code."""
    from mlcloud import state
    from mlcloud.errors import MlcloudError, NotFoundError
    from mlcloud.names import check_cluster_name

    check_cluster_name(name)
    store = state.open_store()
    rec = store.get_cluster(name)
    uid = rec.uid if rec else None  # a live cluster shows its own jobs; a gone one, its last
    j = store.get_job(name, job, uid)
    if j is None:
        if store.get_cluster(name) is None and not store.jobs(name):
            raise NotFoundError(f"no cluster named {name!r}; `mlcloud status` lists them all")
        raise NotFoundError(
            f"no job {job} on cluster {name!r}" if job else f"no jobs on cluster {name!r} yet"
        )
    path = Path(j.log_path)
    pos = 0
    while True:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                pos += len(chunk)
                continue
        if not follow:
            return
        current = store.get_job(name, j.job_id, j.uid)
        if current is None or current.status in state.JOB_DONE:
            if path.exists() and path.stat().st_size > pos:
                continue
            raise typer.Exit(current.exit_code or 0 if current else 0)
        if current.driver_pid and not state.pid_alive(current.driver_pid):
            raise MlcloudError(
                f"job {j.job_id} is no longer followed (its mlcloud process {current.driver_pid}"
                f" is gone); it may still run on the nodes: `mlcloud exec {name} -- ps -ef` to "
                f"look, `mlcloud down {name}` to stop everything"
            )
        time.sleep(0.2)


def exec_(
    name: str = typer.Argument(..., help="Cluster."),
    command: list[str] = typer.Argument(..., help="Command; one argument runs as a shell line."),
) -> None:
    """Run a command on every node in parallel (in the synced workdir), output prefixed by node.

    Exits non-zero if any node failed."""
    from mlcloud import cluster, state
    from mlcloud.parallel import fan_out

    store = state.open_store()
    h = cluster.open_cluster(store, name)
    line = command[0] if len(command) == 1 else shlex.join(command)
    lock = threading.Lock()

    def one(i: int) -> int:
        t, root = h.transports[i], h.nodes[i].root

        def out(text: str) -> None:
            with lock:
                print(f"[node{i}] {text}", flush=True)

        r = t.run(f"cd {shlex.quote(root + '/workdir')} && {line}", on_line=out)
        with lock:
            for text in r.stderr.splitlines():
                print(f"[node{i}] {text}", file=sys.stderr, flush=True)
        return r.exit_code

    try:
        codes = fan_out(one, list(range(len(h.nodes))))
    finally:
        h.close()
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        print(
            "error: failed on " + ", ".join(f"node{i} (exit {c})" for i, c in failed),
            file=sys.stderr,
        )
        raise typer.Exit(failed[0][1])
