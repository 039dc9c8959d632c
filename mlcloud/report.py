"""How the engine tells the person what it is doing, without knowing about terminals.

The CLI passes a Reporter; the engine calls it. Job output goes elsewhere (stdout)."""

from __future__ import annotations

import sys
from typing import Protocol


class Reporter(Protocol):
    def step(self, message: str) -> None:
        """A stage of long work has started (shown as progress on a terminal)."""

    def info(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...


class PlainReporter:
    """Plain lines on stderr: for pipes, CI logs and NO_COLOR."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def step(self, message: str) -> None:
        if not self.quiet:
            print(f"{message}...", file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)
