"""`pull`: a job's outputs (and checkpoints) from every node to this machine."""

from __future__ import annotations

import threading
from pathlib import Path

import typer
from mlcloud.cli import options, output

MAX_SIZE = typer.Option(
    "50GiB",
    "--max-size",
    help="Refuse a node with more than this to send (e.g. 200GiB).",
)


def pull(
    name: str = typer.Argument(..., help="Cluster."),
    dest: Path | None = typer.Argument(
        None,
        help="Where the files go, a folder per node (default: ./mlcloud-results/NAME/job-N).",
        file_okay=False,
    ),
    job: int | None = options.JOB,
    checkpoints: bool = typer.Option(
        False, "--checkpoints", help="Also each node's newest complete checkpoint."
    ),
    node: int | None = options.whole(None, "--node", min=0, help="Only this node (0 is the head)."),
    max_size: str = MAX_SIZE,
    json: bool = options.JSON,
) -> None:
    """Copy each node's MLCLOUD_OUTPUT_DIR of a job to DEST/node<i>/, sending only what
    changed since the last pull. Only regular files come home; nothing lands outside DEST."""
    from mlcloud.cli import managed

    from mlcloud import state
    from mlcloud.jobs import pull as engine
    from mlcloud.remote.sync import parse_size

    cap = parse_size(max_size, "--max-size")
    store = state.open_store()
    name = managed.resolve(store, name)
    rep = output.reporter(quiet=json)
    bars = Bars() if output.fancy() else None
    try:
        done = engine.pull(
            store,
            name,
            dest,
            job_id=job,
            checkpoints=checkpoints,
            node=node,
            max_size=cap,
            report=rep,
            progress=bars.node if bars else None,
        )
    finally:
        if bars:
            bars.close()
        output.close(rep)
    show(done, rep, json)


def show(done, rep, json: bool) -> None:
    """What a pull brought, per node: lines on stderr, or the JSON summary on stdout."""
    from mlcloud.remote.sync import human

    if json:
        output.print_json(summary(done))
        return
    for n in done.nodes:
        rep.info(
            f"node{n.node}: {n.files} file(s), {human(n.bytes)} received, {n.unchanged} "
            f"unchanged -> {n.dest}" + (f" (checkpoint {n.checkpoint})" if n.checkpoint else "")
        )
        if n.skipped:
            rep.warn(
                f"node{n.node}: left {len(n.skipped)} symlink(s) or special file(s) behind "
                f"(only regular files come home): {', '.join(n.skipped[:3])}"
                + (" ..." if len(n.skipped) > 3 else "")
            )
        if done.checkpoints and n.checkpoint is None:
            rep.warn(f"node{n.node}: no checkpoint found in its checkpoint directory")
        if n.gone:
            rep.warn(f"node{n.node}: {len(n.gone)} file(s) deleted on the node while pulling")
    rep.info(f"job {done.job_id} of {done.cluster} pulled into {done.dest}")


def summary(done) -> dict:
    return {
        "cluster": done.cluster,
        "job": done.job_id,
        "dest": done.dest,
        "files": sum(n.files for n in done.nodes),
        "bytes": sum(n.bytes for n in done.nodes),
        "nodes": [
            {
                "node": n.node,
                "dest": n.dest,
                "files": n.files,
                "bytes": n.bytes,
                "unchanged": n.unchanged,
                "skipped": list(n.skipped),
                "gone": list(n.gone),
                "checkpoint": n.checkpoint,
            }
            for n in done.nodes
        ],
    }


class Bars:
    """One progress bar per node on stderr (a terminal only); rich updates are thread-safe."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
        )
        self.started = False
        self.lock = threading.Lock()

    def node(self, label: str) -> _Bar:
        return _Bar(self, label)

    def add(self, label: str, total: int):
        with self.lock:
            if not self.started:  # nothing to send, no bars
                self.started = True
                self.progress.start()
            return self.progress.add_task(label, total=total)

    def close(self) -> None:
        if self.started:
            self.progress.stop()


class _Bar:
    def __init__(self, bars: Bars, label: str) -> None:
        self.bars, self.progress, self.label, self.task = bars, bars.progress, label, None

    def start(self, total: int) -> None:
        self.task = self.bars.add(self.label, total)

    def advance(self, n: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, advance=n)
