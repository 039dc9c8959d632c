"""`autoscale`: run a cluster's controller in the foreground, or one pass of it (cron, CI)."""

from __future__ import annotations

import typer


def autoscale(
    name: str = typer.Argument(..., help="Cluster name."),
    once: bool = typer.Option(False, "--once", help="Make one pass and exit (for cron or CI)."),
    interval: float | None = typer.Option(
        None, "--interval", min=0.5, help="Seconds between passes (default: poll_seconds)."
    ),
) -> None:
    """Watch a cluster: replace lost nodes, resize an elastic job, stop at the budget or
    when idle. Every decision is an event (`mlcloud status NAME`)."""
    from mlcloud import cluster, state
    from mlcloud.autoscale.controller import Controller
    from mlcloud.report import PlainReporter

    store = state.open_store()
    h = cluster.open_cluster(store, name)
    ctl = Controller(store, h, PlainReporter())
    try:
        if once:
            plan = ctl.step()
            if not plan.actions:
                print(f"{name}: nothing to do ({len(h.nodes)} node(s) healthy)")
            return
        print(f"controlling {name} every {interval or ctl.policy.poll_seconds:g} s; Ctrl-C stops")
        ctl.run(interval)
    finally:
        h.close()
