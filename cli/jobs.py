"""`train`, `logs`, `exec`, `cancel`: running things on a cluster's nodes."""

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
from typer.core import TyperCommand


class TrainCommand(TyperCommand):
    """`train`, whose --pull may be given without its DEST (Typer's parser has no option
    whose value may be left out): a bare --pull, one followed by another option, by `--` or
    by nothing, becomes --pull= (the default place)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        out = list(args)
        end = out.index("--") if "--" in out else len(out)
        for i in range(end):
            if out[i] == "--pull" and (i + 1 >= end or out[i + 1].startswith("-")):
                out[i] = "--pull="
        return super().parse_args(ctx, out)


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
    nproc_per_node: int | None = options.whole(
        None,
        "--nproc-per-node",
        min=1,
        max=4096,
        help="Processes per node (default: one per GPU, else 1).",
    ),
    env: list[str] | None = typer.Option(
        None,
        "--env",
        "-e",
        help="KEY=VALUE, or KEY to pass this shell's value, for the job; repeatable. "
        "Sent in a 0600 file, never stored.",
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="Return once the job has started."),
    down: bool = typer.Option(
        False, "--down", help="Tear the cluster down after the job, even if it fails."
    ),
    pull_to: str | None = typer.Option(
        None,
        "--pull",
        metavar="[DEST]",
        help="After the job (even if it fails, before --down), pull its outputs to DEST "
        "(default: ./mlcloud-results/NAME/job-N); write --pull=DEST before the script.",
    ),
    json_out: bool = typer.Option(
        False,
        "--json",
        help="Print the job's cluster, id, status, exit code and log path as JSON on stdout; "
        "the job's output goes to stderr.",
    ),
) -> None:
    """Ship the workdir and run SCRIPT with torchrun on every node (rendezvous at the head).

    Put the script's own options after `--`: mlcloud train demo train.py -- --steps 500"""
    from mlcloud.cli import views

    from mlcloud import state
    from mlcloud.control import nodeevents
    from mlcloud.errors import UsageError
    from mlcloud.jobs import launch
    from mlcloud.jobs.driver import Driver
    from mlcloud.provision import handle, lifecycle
    from mlcloud.state import cluster_lock, paths

    if pull_to is not None and detach:
        raise UsageError(
            "--pull waits for the job to end, --detach does not: run `mlcloud pull` once it ends"
        )
    dest = _pull_dest(pull_to)
    spec = load(file, workdir=str(workdir.resolve()) if workdir else None)
    req = job_request(spec, script, script_args, nproc_per_node, env)
    script, args = req.script, req.args
    launch.validate(req)
    store = state.open_store()
    h = handle.open_cluster(store, name)
    try:
        nodeevents.refuse_stopped(store, h.record)
    except BaseException:
        h.close()
        raise
    rep = output.reporter()
    sink = _printer(sys.stderr if json_out else sys.stdout)
    code = 1
    job: state.JobRecord | None = None
    driver: Driver | None = None
    try:
        with cluster_lock(name):
            _refuse_second_job(store, h)
            nproc = launch.nproc_for(h, req.nproc_per_node)
            job = store.new_job(
                name,
                h.record.uid,
                shlex.join([script, *args]),
                len(h.nodes),
                nproc,
                paths.logs_dir(name),
                driver_pid=os.getpid(),
            )
            driver = Driver(store, h, job, sink)
            cancelled_early = False
            try:
                launch.start(store, h, req, job, rep, driver.emit)
            except BaseException as e:
                try:
                    _stop_quietly(h, job.job_id)  # whatever did start must not keep running
                    status = _start_failure_status(h, job.job_id, e)
                    store.update_job(name, job.uid, job.job_id, status=status, ended=time.time())
                    # `mlcloud cancel` got there first: the job's end, as `logs --follow` has it
                    cancelled_early = status == state.JOB_CANCELLED and isinstance(e, Exception)
                    if cancelled_early:
                        driver.note(f"job {job.job_id} cancelled before it started")
                finally:
                    driver.log.close()
                if not cancelled_early:
                    raise
        output.close(rep)
        if cancelled_early:
            code = exit_code_of(store.get_job(name, job.job_id, job.uid) or job)
        elif detach:
            driver.log.close()
            pid = _spawn_driver(name, job, down)
            store.update_job(name, job.uid, job.job_id, driver_pid=pid)
            if json_out:
                output.print_json(views.job_result_json(store.get_job(name, job.job_id, job.uid)))
            else:
                print(
                    f"job {job.job_id} started on {name}: `mlcloud logs {name} --follow` to watch"
                    + (" (the cluster goes down when it ends)" if down else "")
                )
            return
        else:
            try:
                code = driver.run()
            except KeyboardInterrupt:
                code = 130
    finally:
        output.close(rep)
        h.close()
        if pull_to is not None and job is not None:
            pulled = _pull_after(store, name, job.job_id, dest, down)
            down = down and pulled == 0
            code = code or pulled
        if down and not detach:
            rep = output.reporter()
            try:
                lifecycle.down(store, name, rep)
                rep.info(f"cluster {name} is down")
            finally:
                output.close(rep)
    if json_out:
        try:
            result = driver.outcome if driver is not None else None
            output.print_json(
                views.job_result_json(
                    store.get_job(name, job.job_id, job.uid) or job,
                    result.stopped_by if result else None,
                )
            )
            sys.stdout.flush()
        except BrokenPipeError:
            output.discard()  # nobody reads it: the exit code still tells the job's end
    raise typer.Exit(code)


def job_request(spec, script: str | None, script_args: list[str] | None, nproc: int | None, env):
    """What `train` (and `launch`) runs: the script and its arguments from the command line,
    else the spec's."""
    from mlcloud.errors import UsageError
    from mlcloud.jobs import launch
    from mlcloud.provision import handle
    from mlcloud.remote.sync import Limits
    from mlcloud.spec.task import parse_env

    if script is not None and not script.strip():  # `train NAME "$SCRIPT"` with it unset
        raise UsageError("SCRIPT: empty; name the script, or leave it out for train.script")
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
        workdir=handle.workdir_of(spec),
        script=script,
        args=args,
        nproc_per_node=nproc or spec.train.nproc_per_node,
        envs={**spec.envs, **parse_env(env or [])},
        setup=spec.setup,
        checkpoint_dir=spec.checkpoint_dir,
        limits=Limits.of(spec.max_workdir_files, spec.max_workdir_size),
    )
    return req


def _pull_dest(value: str | None) -> Path | None:
    """--pull's DEST (None: the default place). A DEST that is a file is the script swallowed
    by --pull (`--pull train.py`), not a place for results."""
    from mlcloud.errors import UsageError

    if not value:
        return None
    if Path(value).is_file():
        raise UsageError(
            f"--pull {value}: that is a file; results go into a directory: write --pull=DEST, "
            "or put --pull after the script"
        )
    return Path(value)


def _pull_after(store, name: str, job_id: int, dest: Path | None, down: bool) -> int:
    """Pull the job's outputs: 0, or the exit code of a pull that failed (1) or was
    interrupted (130). Whatever ended the pull is said, not raised, so a failed job's own code
    stays train's; when not everything came home, --down keeps the cluster, and says so."""
    from mlcloud.cli.failures import describe
    from mlcloud.cli.pull import Bars, show

    from mlcloud.errors import EXIT_INTERRUPTED
    from mlcloud.jobs import pull

    rep = output.reporter()
    bars = Bars() if output.fancy() else None
    try:
        done = pull.pull(
            store, name, dest, job_id=job_id, report=rep, progress=bars.node if bars else None
        )
    except (Exception, KeyboardInterrupt) as e:
        failure = describe(e)
        interrupted = failure.exit_code == EXIT_INTERRUPTED
        why = "was interrupted" if interrupted else f"failed: {failure.message}"
        kept = "--down was not done: " if down else ""
        rep.warn(
            f"pulling job {job_id}'s outputs {why}; {kept}the cluster is kept so they are not "
            f"lost: `mlcloud pull {name}`, then `mlcloud down {name}`"
        )
        return EXIT_INTERRUPTED if interrupted else 1
    finally:
        if bars:
            bars.close()
        output.close(rep)
    show(done, rep, json=False)
    return 0


def _refuse_second_job(store, h) -> None:
    """One job at a time: its nodes, ports and checkpoints are the cluster's."""
    from mlcloud import state
    from mlcloud.errors import BusyError
    from mlcloud.jobs import reconcile

    for j in store.jobs(h.record.name, h.record.uid):
        if j.status in state.JOB_DONE:
            continue
        if reconcile.reconcile(store, j, h).status not in state.JOB_DONE:
            name = h.record.name
            raise BusyError(
                f"job {j.job_id} is still running on {name} ({j.command}); wait for it "
                f"(`mlcloud logs {name} --follow`) or stop it (`mlcloud cancel {name}`)"
            )


def _start_failure_status(h, job_id: int, error: BaseException) -> str:
    """CANCELLED for Ctrl-C or a `cancel` that reached the nodes first, else FAILED."""
    from mlcloud import state
    from mlcloud.errors import MlcloudError
    from mlcloud.jobs import reconcile

    if isinstance(error, KeyboardInterrupt):
        return state.JOB_CANCELLED
    if isinstance(error, MlcloudError) and any(
        n.get("cancelled") for n in reconcile.probe(h, job_id)
    ):
        return state.JOB_CANCELLED
    return state.JOB_FAILED


def _stop_quietly(h, job_id: int) -> None:
    """Stop a job that failed to start on every node, without hiding why it failed."""
    from mlcloud.errors import MlcloudError
    from mlcloud.jobs import launch
    from mlcloud.parallel import fan_out

    def one(i: int) -> None:
        try:
            launch.kill(h, i, job_id, grace=5.0)
        except MlcloudError as e:
            print(f"warning: {e}", file=sys.stderr)

    fan_out(one, list(range(len(h.nodes))))


def _printer(stream):
    """A thread-safe line printer. When its reader goes away (`| head -1`, a dead CI pipe)
    the stream is pointed at /dev/null and the error raised once, for the caller to stop
    showing; nothing else (the job, its log, its end) depends on the stream."""
    lock = threading.Lock()

    def sink(line: str) -> None:
        with lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except BrokenPipeError:
                output.discard(stream)
                raise

    return sink


def _spawn_driver(name: str, job, down: bool) -> int:
    log = open(job.log_path + ".driver", "ab")  # noqa: SIM115 (handed to the child)
    argv = [sys.executable, "-m", "mlcloud.jobs.driver", name, str(job.job_id)]
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
    job: int | None = options.JOB,
    follow: bool = typer.Option(False, "--follow", "-F", help="Keep printing until the job ends."),
) -> None:
    """Print a job's node-prefixed output; with --follow, exit with the job's exit code.

    A job no mlcloud process follows any more is read from its nodes (output and end). A
    managed job's NAME: each of its clusters' job in turn (--follow: on to the next cluster
    until the managed job ends, then its exit code)."""
    from mlcloud.cli import managed

    from mlcloud import state
    from mlcloud.spec.task import check_cluster_name

    check_cluster_name(name)
    store = state.open_store()
    mj = managed.managed_job(store, name) if job is None else None
    if mj is None:
        _logs(store, managed.resolve(store, name), job, follow)
        return
    if not follow:
        for c in mj.clusters:
            ran = [j for j in store.jobs(c.cluster, c.uid or None) if c.uid]
            for j in ran:
                print(f"[mlcloud] {c.cluster} job {j.job_id}", flush=True)
                _Tail(Path(j.log_path)).show(final=True)
        return
    last, code = None, 1
    while True:
        cur = store.get_managed(name)
        cluster = managed.resolve(store, name)
        rec = store.get_cluster(cluster)
        newest = store.get_job(cluster, None, rec.uid) if rec else None
        if newest is not None and (cluster, newest.job_id, newest.uid) != last:
            last = (cluster, newest.job_id, newest.uid)
            print(f"[mlcloud] {cluster} job {newest.job_id}", flush=True)
            try:
                _logs(store, cluster, newest.job_id, True)
            except typer.Exit as e:
                code = e.exit_code
            continue
        if cur is None or cur.status in state.JOB_DONE:
            raise typer.Exit(cur.exit_code if cur and cur.exit_code is not None else code)
        time.sleep(0.5)


def _logs(store, name: str, job: int | None, follow: bool) -> None:
    """One cluster's job (default: its newest): printed, or followed to its end (Exit)."""
    from mlcloud import state
    from mlcloud.errors import NotFoundError
    from mlcloud.jobs import reconcile

    rec = store.get_cluster(name)
    uid = rec.uid if rec else None  # a live cluster shows its own jobs; a gone one, its last
    j = store.get_job(name, job, uid)
    if j is None:
        if store.get_cluster(name) is None and not store.jobs(name):
            raise NotFoundError(f"no cluster named {name!r}; `mlcloud status` lists them all")
        raise NotFoundError(
            f"no job {job} on cluster {name!r}"
            if job is not None
            else f"no jobs on cluster {name!r} yet"
        )
    j = reconcile.reconcile(store, j)
    tail = _Tail(Path(j.log_path))
    if not follow:
        _log_gone(j)
        tail.show(final=True)
        return
    while True:
        tail.show(final=False)
        current = store.get_job(name, j.job_id, j.uid) or j
        if current.status not in state.JOB_DONE and not reconcile.followed(current):
            current = reconcile.reconcile(store, current)  # rewrites the log from the nodes
            tail.restart()
            if current.status not in state.JOB_DONE:
                if _adopt(store, current, tail.shown):
                    current = store.get_job(name, j.job_id, j.uid) or current
                    raise typer.Exit(exit_code_of(current))
                continue  # another command adopted it: follow its log
        if current.status in state.JOB_DONE:
            _log_gone(current)
            tail.show(final=True)
            raise typer.Exit(exit_code_of(current))
        time.sleep(0.2)


def _log_gone(job) -> None:
    """A log that should be there and is not (its directory removed, the file deleted) is an
    error: printing nothing would read as a job that printed nothing. Only a job still
    starting may have none yet."""
    from mlcloud import state
    from mlcloud.errors import MlcloudError

    path = Path(job.log_path)
    if path.exists() or (path.parent.is_dir() and job.status not in state.JOB_DONE):
        return
    what = "its directory " + str(path.parent) if not path.parent.is_dir() else str(path)
    raise MlcloudError(
        f"job {job.job_id}'s log is gone: {what} was removed; what the job printed is on its "
        f"nodes until `mlcloud down {job.cluster}`"
    )


def exit_code_of(job) -> int:
    """The job's own code; never 0 for a job that did not succeed."""
    from mlcloud import state

    if job.exit_code:
        return job.exit_code
    if job.status == state.JOB_SUCCEEDED:
        return 0
    return 130 if job.status == state.JOB_CANCELLED else 1


class _Tail:
    """Print a job's log as it grows, whole lines only, counting lines shown per node; after a
    rewrite (the log rebuilt from the nodes) lines already shown are skipped, not repeated."""

    def __init__(self, path: Path):
        self.path, self.pos = path, 0
        self.shown: dict[str, int] = {}
        self.skip: dict[str, int] = {}

    def restart(self) -> None:
        """The log was rewritten: read it again, skipping the nodes' lines already shown
        (mlcloud's own notes differ between the two versions, and are shown)."""
        self.pos = 0
        self.skip = {k: v for k, v in self.shown.items() if k.startswith("[node")}

    def show(self, final: bool) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return
        cut = len(chunk) if final else chunk.rfind(b"\n") + 1
        out = []
        for line in chunk[:cut].splitlines(keepends=True):
            who = line.split(b" ", 1)[0].decode(errors="replace")
            if self.skip.get(who, 0) > 0:
                self.skip[who] -= 1
                continue
            self.shown[who] = self.shown.get(who, 0) + 1
            out.append(line)
        self.pos += cut
        if out:
            try:
                sys.stdout.buffer.write(b"".join(out))
                sys.stdout.flush()
            except BrokenPipeError:
                output.discard()  # stop showing; --follow still ends with the job's code


def _adopt(store, job, shown: dict[str, int]) -> bool:
    """Follow a job its first follower left, from its nodes, to its end; False if another
    command adopted it first. Ctrl-C stops following, not the job."""
    from mlcloud.jobs.driver import Driver
    from mlcloud.provision import handle

    if not store.claim_job(job.cluster, job.uid, job.job_id, job.driver_pid, os.getpid()):
        return False
    nodes = {int(k[5:-1]): v for k, v in shown.items() if k.startswith("[node")}
    h = handle.open_cluster(store, job.cluster)
    try:
        Driver(store, h, job, _printer(sys.stdout), adopt=True, shown=nodes).run(
            stop_on_interrupt=False
        )
    except KeyboardInterrupt:
        store.claim_job(job.cluster, job.uid, job.job_id, os.getpid(), None)
        raise
    finally:
        h.close()
    return True


def cancel(
    name: str = typer.Argument(..., help="Cluster."),
    job: int | None = options.JOB,
    grace: float = options.number(
        30.0, "--grace", min=0, max=86400, help="Seconds between SIGTERM (checkpoint) and SIGKILL."
    ),
    json_out: bool = options.JSON,
) -> None:
    """Stop a job on every node: SIGTERM (the template checkpoints), SIGKILL after --grace.

    Works for a detached job, and for one whose mlcloud process is gone."""
    from mlcloud.cli import managed, views

    from mlcloud import state
    from mlcloud.jobs.cancel import cancel as cancel_job

    store = state.open_store()
    if managed.managed_job(store, name) is not None:  # a managed job: stop it everywhere
        from mlcloud.control import managed as engine

        rep = output.reporter(quiet=json_out)
        try:
            mj = engine.cancel(store, name, rep)
        finally:
            output.close(rep)
        if json_out:
            output.print_json(views.managed_json(store, mj))
        else:
            print(f"managed job {name}: {mj.status}; its clusters are down")
        return
    j, stopped = cancel_job(store, name, job, grace)
    if json_out:
        output.print_json(views.job_result_json(j, "cancel" if stopped else None))
        return
    code = "" if j.exit_code is None else f", exit {j.exit_code}"
    print(
        f"job {j.job_id} on {name} "
        + (f"cancelled ({j.status}{code})" if stopped else f"had already ended: {j.status}{code}")
    )


def exec_(
    name: str = typer.Argument(..., help="Cluster."),
    command: list[str] = typer.Argument(..., help="Command; one argument runs as a shell line."),
    json_out: bool = typer.Option(
        False, "--json", help="Print each node's exit code and output as JSON on stdout."
    ),
) -> None:
    """Run a command on every node in parallel (in the synced workdir), output prefixed by node.

    Exits non-zero if any node failed. Returns when the shell exits: background processes
    (`cmd &`) should send their output to a file."""
    from mlcloud import state
    from mlcloud.errors import UsageError
    from mlcloud.parallel import fan_out
    from mlcloud.provision import handle
    from mlcloud.remote import shell

    if not any(c.strip() for c in command):
        raise UsageError("COMMAND: empty; give the command to run on every node")
    store = state.open_store()
    h = handle.open_cluster(store, name)
    line = command[0] if len(command) == 1 else shell.join(command)
    lock = threading.Lock()
    say = _printer(sys.stdout)

    def one(i: int):
        t, root = h.transports[i], h.nodes[i].root
        kept: list[str] = []

        def out(text: str) -> None:
            if json_out:
                kept.append(text)
                return
            try:
                say(f"[node{i}] {text}")
            except BrokenPipeError:
                pass

        r = t.run(
            f"{h.ctl(i)} exec {shell.quote(root + '/workdir')} {shell.quote(line)}", on_line=out
        )
        if not json_out:
            with lock:
                for text in r.stderr.splitlines():
                    print(f"[node{i}] {text}", file=sys.stderr, flush=True)
        return r.exit_code, "".join(k + "\n" for k in kept), r.stderr

    try:
        results = fan_out(one, list(range(len(h.nodes))))
    finally:
        h.close()
    failed = [(i, c) for i, (c, _, _) in enumerate(results) if c != 0]
    if json_out:
        output.print_json(
            {
                "cluster": name,
                "nodes": [
                    {"node": i, "exit_code": c, "stdout": o, "stderr": e}
                    for i, (c, o, e) in enumerate(results)
                ],
            }
        )
    if failed:
        print(
            "error: failed on " + ", ".join(f"node{i} (exit {c})" for i, c in failed),
            file=sys.stderr,
        )
        raise typer.Exit(failed[0][1])
