"""Transport for nodes that are directories on this machine (the local provider)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
        stdin: bytes | Iterable[bytes] | None = None,
    ) -> RunResult:
        argv = ["bash", "-c", command]
        # the user's own SSH session says nothing about the node: keep it out
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")} | self.env
        assert on_line is None or stdin is None, "streaming runs take no input"
        if stdin is not None and not isinstance(stdin, bytes):
            stdin = b"".join(stdin)
        # its own process group, so a timeout or an interrupt ends the command and everything
        # it started, not only bash
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        try:
            if on_line is None:
                out, err = proc.communicate(stdin, timeout=timeout)
            else:
                out, err = b"", self._stream(proc, on_line, timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RemoteError(f"{self.label}: command timed out after {timeout}s") from None
        except BaseException:
            _kill_group(proc)
            raise
        return RunResult(
            proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        )

    @staticmethod
    def _stream(proc, on_line, timeout: float | None) -> bytes:
        """Feed stdout to on_line as it comes; stderr is drained aside, so a chatty stderr
        cannot block stdout. Returns stderr; raises TimeoutExpired once timed out."""
        assert proc.stdout is not None and proc.stderr is not None
        err: list[bytes] = []
        drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
        drain.start()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_group(proc, wait=False)

        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.start()
        try:
            for raw in proc.stdout:
                on_line(raw.decode(errors="replace").rstrip("\n"))
            proc.wait()
        finally:
            if timer:
                timer.cancel()
        drain.join()
        if expired.is_set():
            raise subprocess.TimeoutExpired(proc.args, timeout or 0)
        return b"".join(err)

    @contextmanager
    def stream(self, command: str, stdin: bytes = b"") -> Iterator[_ProcessPipe]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")} | self.env
        proc = subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        err: list[bytes] = []
        drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
        drain.start()
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(stdin)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it ended without reading: its exit code and stderr say why
            yield _ProcessPipe(proc, drain, err)
        finally:
            if proc.poll() is None:
                _kill_group(proc, wait=False)
            proc.wait()
            drain.join(timeout=5)
            assert proc.stdout is not None
            proc.stdout.close()

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


class _ProcessPipe:
    """A local command's stdout, read as it comes (LocalTransport.stream)."""

    def __init__(self, proc: subprocess.Popen, drain: threading.Thread, err: list[bytes]):
        self.proc, self.drain, self.err = proc, drain, err

    def read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        return os.read(self.proc.stdout.fileno(), n)

    def finish(self) -> RunResult:
        code = self.proc.wait()
        self.drain.join()
        return RunResult(code, "", b"".join(self.err).decode(errors="replace"))


def _kill_group(proc: subprocess.Popen, wait: bool = True) -> None:
    """SIGKILL the command's whole process group (it leads one of its own)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if wait:
        try:
            proc.communicate(timeout=5)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            pass
