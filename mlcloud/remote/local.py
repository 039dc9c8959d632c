"""Transport for nodes that are directories on this machine (the local provider)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from mlcloud.remote.sync import local_sync
from mlcloud.remote.transport import RemoteError, RunResult, SyncStats


class LocalTransport:
    def __init__(self, label: str, env: dict[str, str] | None = None):
        self.label = label
        self.python = sys.executable
        self.env = env or {}  # what sets this node apart on a shared machine (its GPUs)

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_line: Callable[[str], None] | None = None,
        stdin: bytes | None = None,
    ) -> RunResult:
        argv = ["bash", "-c", command]
        # the user's own SSH session says nothing about the node: keep it out
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")} | self.env
        if on_line is None:
            try:
                p = subprocess.run(
                    argv, capture_output=True, timeout=timeout, input=stdin or b"", env=env
                )
            except subprocess.TimeoutExpired:
                raise RemoteError(f"{self.label}: command timed out after {timeout}s") from None
            return RunResult(
                p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
            )
        assert stdin is None, "streaming runs take no input"
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
        )
        assert proc.stdout is not None and proc.stderr is not None
        err: list[bytes] = []  # drained aside, so a chatty stderr cannot block stdout
        drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
        drain.start()
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        try:
            for raw in proc.stdout:
                on_line(raw.decode(errors="replace").rstrip("\n"))
            code = proc.wait()
        finally:
            if timer:
                timer.cancel()
        drain.join()
        if timer and code == -9:
            raise RemoteError(f"{self.label}: command timed out after {timeout}s")
        return RunResult(code, "", b"".join(err).decode(errors="replace"))

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".put-")
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, path: str) -> bytes | None:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def interactive(self, cwd: str) -> list[str]:
        """A shell in the node's directory (the node is this machine)."""
        shell = os.environ.get("SHELL", "bash")
        return ["bash", "-c", 'cd "$1" && exec "$2" -i', "mlcloud-ssh", cwd, shell]

    def sync(self, local_dir: Path, remote_dir: str) -> SyncStats:
        return local_sync(local_dir, Path(remote_dir))

    def close(self) -> None:
        pass
