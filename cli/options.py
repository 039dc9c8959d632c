"""Option objects shared by several commands, so the same flag means the same thing everywhere."""

from typing import Any

import typer

from mlcloud import numbers

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


def number(
    default: float | None,
    *flags: str,
    min: float,
    max: float,
    above: bool = False,
    help: str,
    **kw: Any,
) -> Any:
    """A float option held to a finite number in range (mlcloud/numbers.py): click's own
    `min=` lets nan, inf and a 400-digit number (inf) through."""
    return typer.Option(
        default, *flags, callback=_checked(min, max, above, whole=False), help=help, **kw
    )


def whole(
    default: int | None, *flags: str, min: int, max: int = numbers.MAX_INT, help: str, **kw: Any
) -> Any:
    """An int option held to its range: a 400-digit --job would overflow the store."""
    return typer.Option(
        default, *flags, callback=_checked(min, max, False, whole=True), help=help, **kw
    )


def _checked(low: float, high: float, above: bool, whole: bool):
    def check(value):
        if value is None:
            return None
        try:
            return numbers.check(value, low, high, above=above, whole=whole)
        except numbers.Invalid as e:
            raise typer.BadParameter(str(e)) from None

    return check


SSH_PORT = whole(None, "--ssh-port", min=1, max=65535, help="SSH port (default: 22).")
JOB = whole(None, "--job", "-j", min=0, help="Job id (default: the latest).")


def given(value: Any) -> Any:
    """Callback: a flag given empty (`--region "$REGION"` with it unset, or one of a repeated
    flag's values) is refused, never read as left out: that would fall back to a default."""
    items = value if isinstance(value, list | tuple) else [value]
    if value is not None and any(not str(v).strip() for v in items):
        raise typer.BadParameter("empty; give a value, or leave the option out for the default")
    return value


SSH_USER = typer.Option(
    None, "--ssh-user", callback=given, help="SSH login user (default: the host's user@)."
)
PROXY_COMMAND = typer.Option(
    None,
    "--proxy-command",
    callback=given,
    help="OpenSSH ProxyCommand, %h and %p substituted (bastions).",
)
