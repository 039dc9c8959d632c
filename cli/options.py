"""Option objects shared by several commands, so the same flag means the same thing everywhere."""

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
