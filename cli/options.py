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
