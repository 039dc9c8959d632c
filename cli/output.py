"""Everything the CLI shows a person: progress, tables, JSON, prompts.

Rich on a terminal; plain lines for pipes, CI logs and NO_COLOR. Listings take --json."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from mlcloud.errors import Aborted, UsageError
from mlcloud.report import PlainReporter


def fancy() -> bool:
    plain = os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb"
    return sys.stderr.isatty() and not plain


class RichReporter:
    """A spinner for the current step; finished steps stay on screen as lines."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self._status: Any = None
        self._step: str | None = None

    def step(self, message: str) -> None:
        self._end_step()
        self._step = message
        self._status = self.console.status(message)
        self._status.start()

    def _end_step(self) -> None:
        if self._status is not None:
            self._status.stop()
            self.console.print(f"[green]✓[/green] {self._step}", highlight=False)
            self._status = None

    def info(self, message: str) -> None:
        self.console.print(f"  {message}", highlight=False, markup=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def close(self) -> None:
        self._end_step()


def reporter(quiet: bool = False):
    if fancy() and not quiet:
        return RichReporter()
    return PlainReporter(quiet=quiet)


def close(rep) -> None:
    if isinstance(rep, RichReporter):
        rep.close()


def discard(stream=None) -> None:
    """The stream's reader went away (`| head -1`, a dead CI pipe): point it at /dev/null, so
    what is still printed, and the flush at exit, go nowhere instead of failing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, (stream or sys.stdout).fileno())
    os.close(devnull)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_json_line(data: Any) -> None:
    """One compact JSON object and its newline in one write: an interrupt between the two
    would leave the next object on the same line."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """One way to show every listing: a rich table on a terminal, aligned text elsewhere."""
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, title_justify="left", box=None, header_style="bold")
        for c in columns:
            t.add_column(c)
        for row in cells:
            t.add_row(*row, style=None)
        Console().print(t)
        return
    if title:
        print(title)
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def confirm(question: str, yes: bool) -> None:
    """Ask, or refuse without a terminal instead of hanging; --yes skips the question."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(
            f"{question} needs confirmation and there is no terminal to ask; rerun with --yes"
        )
    if not ask(question):
        raise Aborted()


def ask(question: str) -> bool:
    """A person's yes (y, yes) or no (anything else, end of input included), asked on stderr,
    all of it (click's prompt writes a space to stdout): stdout stays the --json's."""
    sys.stderr.write(f"{question} [y/N]: ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
