"""`doctor`: what is wrong with this machine's mlcloud home, and the way back from a lost
state database."""

from __future__ import annotations

import sys
from dataclasses import asdict

import typer
from mlcloud.cli import options, output


def doctor(
    rebuild: bool = typer.Option(
        False,
        "--rebuild",
        help="Move a damaged state.db aside and rebuild it from the clouds' tags and the "
        "local and ssh providers' records; a healthy one gains the clusters it lacks (asks).",
    ),
    provider: list[str] | None = typer.Option(
        None,
        "--provider",
        "-p",
        callback=options.given,
        help="--rebuild: only search these providers (repeatable; default: every provider "
        "this machine has credentials for; the others are named as skipped).",
    ),
    region: list[str] | None = typer.Option(
        None,
        "--region",
        callback=options.given,
        help="--rebuild: cloud regions to search (default: the configured one).",
    ),
    timeout: float = options.number(
        10.0, "--timeout", min=0.1, max=3600, help="Seconds to wait for each node to answer."
    ),
    yes: bool = options.YES,
    json: bool = options.JSON,
) -> None:
    """Check the home, the state database, the locks and the clusters' nodes."""
    from mlcloud import providers
    from mlcloud.provision import doctor as engine

    done = None
    if rebuild:
        chosen = list(dict.fromkeys(provider or providers.names()))
        what = (
            "move the damaged state database aside and rebuild it"
            if engine.database_damaged()
            else "add the clusters the state database lacks"
        )
        output.confirm(f"{what} from {', '.join(chosen)}?", yes)
        done = engine.rebuild(chosen, region or [], named=bool(provider))
    checks = engine.run_checks(timeout)
    failed = [c for c in checks if c.status == engine.FAIL]
    incomplete = bool(done and done.unsearched)  # a CI script must not take it for a whole one
    if json:
        output.print_json(
            {
                "ok": not failed and not incomplete,
                "checks": [asdict(c) for c in checks],
                "rebuild": asdict(done) if done else None,
            }
        )
    else:
        if done:
            _show_rebuild(done)
        output.table(
            ["area", "subject", "status", "detail"],
            [[c.area, c.subject, c.status, c.detail] for c in checks],
        )
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        print(f"error: {first.subject}: {first.detail}{more}", file=sys.stderr)
        raise typer.Exit(1)
    if incomplete:
        print(
            f"error: rebuild incomplete: {', '.join(done.unsearched)} could not be searched "
            "(see the notes); fix that and run `mlcloud doctor --rebuild` again",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _show_rebuild(done) -> None:
    for line in done.skipped:
        print(f"warning: {line}", file=sys.stderr)
    if done.moved_to:
        print(f"the damaged database was moved to {done.moved_to}")
    for c in done.clusters:
        where = f" in {c.region}" if c.region else ""
        print(f"recovered {c.name} ({c.provider}{where}, {c.nodes} node(s)): {c.uid}")
    if not done.clusters:
        print("no cluster of this home was found that state lacks")
    for note in done.notes:
        print(f"note: {note}")
    print("jobs and billing history are not recovered; `mlcloud down NAME` removes a cluster\n")
