"""The Transport interface every provider hands the engine, and its shared types."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mlcloud.errors import MlcloudError


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class SyncStats:
    files_sent: int
    bytes_sent: int
    files_deleted: int
    relayed: bool = False  # passed on by another node: none of it crossed this machine's link


class RemoteError(MlcloudError):
    """A node could not be reached or a command on it failed; the message names the node."""


class UnreachableError(RemoteError):
    """No connection could be made (a new machine may still be booting)."""


class LostError(RemoteError):
    """The connection went away mid-operation: the node rebooted, vanished or was cut off."""


class SilentError(LostError):
    """The node sent nothing, asked, for `seconds`: it or its network is gone (a silent cut,
    a machine gone without a reset). The controller counts such a node lost at once."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.seconds = seconds


class Pipe(Protocol):
    """A running command's stdout as bytes (Transport.stream)."""

    def read(self, n: int) -> bytes:
        """Up to n bytes, fewer when fewer have arrived; b"" at the end of the output."""

    def finish(self) -> RunResult:
        """Wait for the command to end: its exit code and stderr (stdout was read above)."""


class Transport(Protocol):
    label: str  # how messages and log prefixes name the node, e.g. "node1"
    python: str  # the node's python interpreter (runs node_ctl.py and torchrun)

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_line: Callable[[str], None] | None = None,
        stdin: bytes | Iterable[bytes] | None = None,
    ) -> RunResult:
        """Run a shell command; with on_line, stdout is streamed line by line instead of kept.
        stdin may come in pieces (sent as they are made)."""

    def stream(self, command: str, stdin: bytes = b"") -> AbstractContextManager[Pipe]:
        """Run a shell command whose stdout is read as it comes, unbounded and binary (files
        coming home); leaving the block early ends the command."""

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Write a file on the node atomically with the given mode (secrets: 0600)."""

    def get(self, path: str) -> bytes | None:
        """A file's content, or None if it does not exist."""

    def sync(self, local_dir: Path, remote_dir: str) -> SyncStats:
        """Make remote_dir mirror local_dir (ignore rules applied), sending only what changed."""

    def interactive(self, cwd: str) -> list[str]:
        """The argv of an interactive shell on the node, starting in cwd (`mlcloud ssh`)."""

    def close(self) -> None: ...


def check(result: RunResult, transport: Transport, what: str) -> RunResult:
    if result.exit_code != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise RemoteError(
            f"{transport.label}: {what} failed with exit code {result.exit_code}"
            + (f": {detail[-1]}" if detail else "")
        )
    return result
