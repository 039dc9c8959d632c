"""`events`: what happened to a cluster and why, the node agents' decisions included."""

from __future__ import annotations

import sys
import time

import typer
from mlcloud.cli import options, output


def events(
    name: str = typer.Argument(..., help="Cluster."),
    json: bool = options.JSON,
    follow: bool = typer.Option(
        False, "--follow", "-F", help="Keep asking the nodes and print new events as they come."
    ),
    interval: float = options.number(
        2.0, "--interval", min=0.5, max=86400, help="--follow: seconds between two looks."
    ),
) -> None:
    """Show a cluster's events (time in UTC, kind, node, message): scaling, idle teardown,
    budget stop, stalls, preemption notices, each with its reason. With --json, one JSON
    array (with --follow: one JSON object a line)."""
    from mlcloud.cli import managed

    from mlcloud import state
    from mlcloud.control import nodeevents
    from mlcloud.control.agentview import Event
    from mlcloud.errors import NotFoundError
    from mlcloud.spec.task import check_cluster_name

    check_cluster_name(name)
    store = state.open_store()
    mj = managed.managed_job(store, name)
    if mj is not None and not follow:  # every cluster of the managed job, merged in time
        log = sorted(
            (
                Event(t, kind, node, f"{c.cluster}: {message}")
                for c in mj.clusters
                for t, kind, node, message in store.event_log(c.cluster, c.uid or "")
            ),
            key=lambda e: e.time,
        )
        if json:
            output.print_json([_json(e) for e in log])
        else:
            for e in log:
                print(_line(e))
        return
    if mj is not None:
        name = managed.resolve(store, name)
    # what was printed, not how many: a node's event merged late sorts before ones shown already
    shown: set = set()
    while True:
        rec = store.get_cluster(name)
        if rec is None:  # torn down (by `down`, or a budget stop on a cloud): its last events
            uid = store.last_uid(name)
            if uid is None:
                raise NotFoundError(f"no cluster named {name!r}; `mlcloud status` lists them all")
            log = [Event(*row) for row in store.event_log(name, uid)]
        else:
            nodeevents.refresh(store, rec)
            log = nodeevents.log(store, rec)
        new = [e for e in log if e not in shown]
        shown.update(new)
        if json and not follow:
            output.print_json([_json(e) for e in log])
            return
        for e in new:
            if json:
                output.print_json_line(_json(e))
            else:
                print(_line(e), flush=True)
        if not follow or rec is None:
            if not log:  # a note, not an event: stdout stays JSON lines with --json
                print(f"no events for {name} yet", file=sys.stderr if json else sys.stdout)
            return
        time.sleep(interval)


def _json(e) -> dict:
    from mlcloud.cli.views import iso

    return {"time": iso(e.time), "kind": e.kind, "node": e.node, "message": e.message}


def _line(e) -> str:
    from mlcloud.cli.views import iso

    node = "-" if e.node is None else f"node{e.node}"
    return f"{iso(e.time)}  {e.kind:<15} {node:<6} {e.message}"
