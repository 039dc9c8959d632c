"""Option objects shared by several commands, so the same flag means the same thing everywhere."""

import math
from typing import Any

import typer

YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")
JSON = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
SPEC_FILE = typer.Option(
    None,
    "--file",
    "-f",
    help="Task spec (mlcloud.yaml); flags override its fields.",
    dir_okay=False,
)
IDENTITY = typer.Option(
    None,
    "--identity",
    "-i",
    help="SSH private key (default: ssh-agent, then ~/.ssh/id_*).",
    dir_okay=False,
)
SSH_USER = typer.Option(None, "--ssh-user", help="SSH login user (default: the host's user@).")
SSH_PORT = typer.Option(None, "--ssh-port", help="SSH port (default: 22).")
PROXY_COMMAND = typer.Option(
    None, "--proxy-command", help="OpenSSH ProxyCommand, %h and %p substituted (bastions)."
)


def finite(value: float | None) -> float | None:
    """Callback for float options: nan and inf pass click's `min=` bounds, then break the
    arithmetic behind them (a grace of nan, an age limit of nan that keeps nothing)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def number(default: float | None, flag: str, *, min: float, help: str) -> Any:
    """A float option held to `min` and to finite: click's bound alone lets nan and inf in."""
    return typer.Option(default, flag, min=min, callback=finite, help=help)
