"""`autoscale`: run a cluster's controller in the foreground, or one pass of it (cron, CI)."""

from __future__ import annotations

import typer
from mlcloud.cli import options, output


def autoscale(
    name: str = typer.Argument(..., help="Cluster name."),
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

    check_cluster_name(name)
    if json and not once:
        raise UsageError("--json goes with --once: one pass, one JSON document")
    store = state.open_store()
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
