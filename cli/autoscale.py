"""`autoscale`: run a cluster's controller in the foreground, or one pass of it (cron, CI)."""

from __future__ import annotations

import typer
from mlcloud.cli import options, output


def autoscale(
    name: str | None = typer.Argument(None, help="Cluster name (or --all)."),
    all_: bool = typer.Option(
        False,
        "--all",
        help="Every cluster in the store, each led by one of however many controllers run "
        "(a service: systemd, Kubernetes, a CI cron with --once).",
    ),
    once: bool = typer.Option(False, "--once", help="Make one pass and exit (for cron or CI)."),
    interval: float | None = options.number(
        None,
        "--interval",
        min=0.5,
        max=86400,
        help="Seconds between passes (default: poll_seconds).",
    ),
    json: bool = options.JSON,
) -> None:
    """Watch a cluster: replace lost nodes, resize an elastic job, stop at the budget or
    when idle. Every decision is an event (`mlcloud status NAME`). With --once --json, the
    pass's decisions: {"cluster", "stopped", "actions": [{"kind", "reason", "node"}]}."""
    from dataclasses import asdict

    from mlcloud import state
    from mlcloud.control import nodeevents
    from mlcloud.control.controller import Controller
    from mlcloud.errors import UsageError
    from mlcloud.provision import handle
    from mlcloud.report import PlainReporter
    from mlcloud.spec.task import check_cluster_name

    if json and not once:
        raise UsageError("--json goes with --once: one pass, one JSON document")
    if all_ == (name is not None):
        raise UsageError("name one cluster, or pass --all for every cluster in the store")
    store = state.open_store()
    if all_:
        _all(store, interval, once, json)
        return
    check_cluster_name(name)
    h = handle.open_cluster(store, name)
    nodeevents.gather(store, h)  # nodes that stopped themselves are stopped, not idle to stop
    ctl = Controller(store, h, PlainReporter(quiet=json))
    stopped = (
        f"{name}: every node is stopped (`mlcloud status {name}` says why); "
        f"`mlcloud down {name}` removes the cluster"
    )
    try:
        if once:
            plan = ctl.step()
            if not ctl.gone:  # one pass is no controller the agents should wait for: a cron
                ctl.detach()  # hour apart would read as a lost heartbeat and stop the nodes
            if json:
                output.print_json(
                    {
                        "cluster": name,
                        "stopped": ctl.gone,
                        "actions": [asdict(a) for a in plan.actions],
                    }
                )
            elif not plan.actions:
                print(
                    stopped
                    if ctl.gone
                    else f"{name}: nothing to do ({len(h.nodes)} node(s) healthy)"
                )
            return
        print(f"controlling {name} every {interval or ctl.policy.poll_seconds:g} s; Ctrl-C stops")
        ctl.run(interval)
        if ctl.gone:
            print(stopped)
    finally:
        h.close()


def _all(store, interval: float | None, once: bool, json: bool) -> None:
    """Lead every cluster nobody leads, until interrupted (or one pass each with --once)."""
    import threading

    from mlcloud.control import fleet
    from mlcloud.report import PlainReporter

    service = fleet.Fleet(store, PlainReporter(quiet=json), interval, every=interval or 10.0)
    if once:
        taken = service.sweep(once=True)
        if json:
            output.print_json({"controller": fleet.me(), "clusters": taken})
        else:
            print(f"one pass over {len(taken)} cluster(s) nobody else leads: {', '.join(taken)}")
        return
    print(f"controlling every cluster nobody else leads, as {fleet.me()}; Ctrl-C stops")
    stop = threading.Event()
    try:
        service.run(stop)
    finally:
        stop.set()
