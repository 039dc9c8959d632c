"""Entry point: the Typer app, global flags, and the one place errors become exit codes."""

from __future__ import annotations

import os
import signal
import sys

import typer

from mlcloud import __version__

app = typer.Typer(
    name="mlcloud",
    help="GPU clusters on demand: `up` a cluster, `train` across its nodes, `down` when done.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"mlcloud {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    if debug:
        os.environ["MLCLOUD_DEBUG"] = "1"


def _register() -> None:
    from mlcloud.cli import autoscale, cluster, jobs, money, project

    app.command("up")(cluster.up)
    app.command("down")(cluster.down)
    app.command("status")(cluster.status)
    app.command("train")(jobs.train)
    app.command("logs")(jobs.logs)
    app.command("exec")(jobs.exec_)
    app.command("cancel")(jobs.cancel)
    app.command("autoscale")(autoscale.autoscale)
    app.command("ssh")(cluster.ssh)
    app.command("gc")(cluster.gc)
    app.command("gpus")(money.gpus)
    app.command("offers")(money.offers)
    app.command("cost")(money.cost)
    app.add_typer(money.catalog_app, name="catalog")
    app.command("init")(project.init)


_register()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Run the CLI; user errors print one line and exit non-zero, bugs keep their traceback."""
    from mlcloud.errors import MlcloudError

    # CI runners and shells stop us with SIGTERM/SIGHUP: unwind like Ctrl-C, so `train --down`
    # and a half-made `up` still clean up and nothing is left billing.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        app()
    except MlcloudError as e:
        if os.environ.get("MLCLOUD_DEBUG") == "1":  # set by --debug (or by the user)
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
