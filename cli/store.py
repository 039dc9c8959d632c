"""`state`: the state store itself (moving a home's state into a team's shared store)."""

from __future__ import annotations

from dataclasses import asdict

import typer
from mlcloud.cli import options, output

state_app = typer.Typer(help="The state store: move a home's state to a shared one.")


@state_app.command("import")
def import_(json: bool = options.JSON) -> None:
    """Copy this home's SQLite clusters (with their jobs, billing, events, ssh host claims and
    keys) into the shared store MLCLOUD_STATE_URL names. Safe to repeat: what the store
    already has is skipped."""
    from mlcloud.state import paths, transfer

    done = transfer.import_home(paths.home())
    if json:
        output.print_json(asdict(done))
        return
    for name in done.clusters:
        print(f"imported {name}")
    if done.history:
        print(f"imported the history (jobs, billing, events) of {done.history} gone cluster(s)")
    for name in done.skipped:
        print(f"already in the shared store: {name}")
    for what in done.conflicts:
        typer.echo(f"warning: not imported: {what}; `mlcloud down` one of them first", err=True)
    if not (done.clusters or done.history or done.skipped or done.conflicts):
        print(f"nothing to import from {done.source}")
