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
    from mlcloud.state import timeouts

    timeouts.check()


def _register() -> None:
    from mlcloud.cli import (
        autoscale,
        cluster,
        doctor,
        events,
        jobs,
        managed,
        money,
        project,
        pull,
        store,
    )

    app.command("up")(cluster.up)
    app.command("down")(cluster.down)
    app.command("status")(cluster.status)
    app.command("events")(events.events)
    app.command("train", cls=jobs.TrainCommand)(jobs.train)
    app.command("launch", cls=managed.LaunchCommand)(managed.launch)
    app.command("jobs")(managed.jobs_)
    app.command("logs")(jobs.logs)
    app.command("exec")(jobs.exec_)
    app.command("cancel")(jobs.cancel)
    app.command("pull")(pull.pull)
    app.command("autoscale")(autoscale.autoscale)
    app.command("ssh")(cluster.ssh)
    app.command("gc")(cluster.gc)
    app.command("gpus")(money.gpus)
    app.command("offers")(money.offers)
    app.command("cost")(money.cost)
    app.add_typer(money.catalog_app, name="catalog")
    app.command("init")(project.init)
    app.command("doctor")(doctor.doctor)
    app.add_typer(store.state_app, name="state")


_register()


_interrupted = False


def _interrupt(signum, frame) -> None:
    """The first stop request unwinds like Ctrl-C. A SIGTERM or SIGHUP after it is ignored, so
    the cleanup it started (a half-made `up` rolled back, `train --down`) finishes: `timeout`
    and process-group kills deliver the same SIGTERM twice. A second Ctrl-C still stops."""
    global _interrupted
    if _interrupted and signum != signal.SIGINT:
        return
    _interrupted = True
    raise KeyboardInterrupt


# Libraries that log (paramiko's tracebacks while a proxy command fails, botocore's retries):
# quiet unless --debug, so a failure is the one line mlcloud prints.
QUIET_LOGGERS = ("paramiko", "botocore", "boto3", "urllib3", "filelock", "google")


def _leading(argv: list[str]) -> list[str]:
    """The options before the command name (the root's own: --debug, --version, --help)."""
    out = []
    for a in argv:
        if not a.startswith("-") or a == "--":
            break
        out.append(a)
    return out


def _wants_json(argv: list[str]) -> bool:
    """Whether the command named in argv takes --json and was given it (before any `--`)."""
    args = argv[: argv.index("--")] if "--" in argv else argv
    if "--json" not in args:
        return False
    cmd = typer.main.get_command(app)
    for a in args:
        if a.startswith("-"):
            continue
        commands = getattr(cmd, "commands", None)  # a group: `a` names its subcommand
        if commands is None:
            break
        if a not in commands:
            return False
        cmd = commands[a]
    return any("--json" in getattr(p, "opts", ()) for p in cmd.params)


def run(argv: list[str]) -> int:
    """Run one command; every way it can end becomes an exit code, and every failure one line
    on stderr (plus an error object on stdout with --json). --debug adds the traceback."""
    import logging

    from mlcloud.cli.failures import describe

    from mlcloud.errors import EXIT_USAGE

    debug = "--debug" in _leading(argv) or os.environ.get("MLCLOUD_DEBUG") == "1"
    if not debug:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    command = typer.main.get_command(app)
    try:
        with command.make_context("mlcloud", list(argv)) as ctx:
            command.invoke(ctx)
        return 0
    except typer.Exit as e:  # --help, --version, typer.Exit(code)
        return e.exit_code
    except BrokenPipeError:
        # stdout's reader went away (`| head`): nothing more can be shown there
        from mlcloud.cli.output import discard

        discard()
        return 1
    except (Exception, KeyboardInterrupt) as e:  # click's Abort is an Exception
        if type(e).__name__ == "NoArgsIsHelpError":  # `mlcloud` alone: the help, as click does
            print(e.format_message(), file=sys.stderr)
            return EXIT_USAGE
        failure = describe(e)
        if debug:
            import traceback

            traceback.print_exc()
        if _wants_json(argv):
            from mlcloud.cli.output import print_json_line

            # one line: a stream of one object a line (`events --json --follow`) stays one
            print_json_line(failure.json())
        # a declined prompt is the person's choice, not a failure: one word, as other CLIs say
        aborted = failure.kind == "aborted"
        print(failure.message if aborted else f"error: {failure.message}", file=sys.stderr)
        return failure.exit_code


def main() -> None:
    """The console script."""
    # CI runners and shells stop us with SIGTERM/SIGHUP: unwind like Ctrl-C, so `train --down`
    # and a half-made `up` still clean up and nothing is left billing.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    sys.exit(run(sys.argv[1:]))
