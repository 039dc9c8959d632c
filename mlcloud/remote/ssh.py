"""Transport over SSH (paramiko): one connection per node, reused for every operation.

Host keys are checked against mlcloud's pins before authenticating (keys.check_or_pin), so a
changed key is refused before any credential is offered.

A node can vanish without a TCP reset (a spot reclaim, a cut link); TCP alone would notice only
after ~15 minutes of retries. A heartbeat thread per connection times the node's silence: the
socket notes when the node last sent anything, the heartbeat asks for an answer (opening a
channel, which sshd must answer) once it has heard nothing for a moment, and closes the
connection when the silence reaches its limit, so every operation on it fails at once as
SilentError. Anything the node sends counts as an answer, so a reply queued behind a large
transfer on a slow link is never taken for silence (docs/architecture.md, "Liveness").
"""

from __future__ import annotations

import contextlib
import io
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlcloud.errors import UsageError
from mlcloud.remote.transport import (
    LostError,
    RemoteError,
    RunResult,
    SilentError,
    SyncStats,
    UnreachableError,
)
from mlcloud.state import timeouts

CONNECT_TIMEOUT = 15.0
# Heartbeats: asked after SSH_HEARTBEAT_EVERY s (default 2) of silence; SSH_HEARTBEAT_TIMEOUT s
# (default 8) of silence, asked: the node is gone. Both in mlcloud/state/timeouts.py.
STREAM_IDLE_TIMEOUT = 300.0  # a streamed command silent this long is stalled (hashing is slower)


@dataclass(frozen=True)
class SshTarget:
    """How to reach one node over SSH."""

    host: str
    port: int = 22
    user: str = "root"
    identity_file: str | None = None  # None: ssh-agent, then ~/.ssh/id_{ed25519,ecdsa,rsa}
    proxy_command: str | None = None  # OpenSSH style; %h and %p are substituted
    host_key_id: str = ""  # the identity the host key is pinned under
    python: str = "python3"
    # offered after the user's keys: the cluster's own key where the node accepts it (ssh
    # hosts of a shared store); then a missing identity_file is passed over, not refused
    fallback_identity: str | None = None

    @property
    def pin_id(self) -> str:
        return self.host_key_id or (self.host if self.port == 22 else f"[{self.host}]:{self.port}")


def load_identity(path: str):
    import paramiko

    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"identity file {p} not found")
    try:
        return paramiko.PKey.from_path(p)
    except paramiko.PasswordRequiredException:
        raise UsageError(
            f"identity file {p} is passphrase-protected; load it into ssh-agent "
            "and leave --identity out"
        ) from None
    except (paramiko.SSHException, ValueError) as e:
        raise UsageError(f"identity file {p} is not a usable private key: {e}") from None


def default_identities() -> list:
    """What OpenSSH would offer with no -i: the agent's keys, then the default key files."""
    import paramiko

    keys = list(paramiko.Agent().get_keys())
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        p = Path.home() / ".ssh" / name
        if p.is_file():
            try:
                keys.append(paramiko.PKey.from_path(p))
            except (paramiko.SSHException, ValueError):
                continue
    return keys


class SshTransport:
    def __init__(self, target: SshTarget, label: str, on_connect: Callable[[], None] | None = None):
        self.target = target
        self.label = label
        self._on_connect = on_connect  # told once per connection made (the ssh provider's claim)
        self.python = target.python
        self._lock = threading.Lock()
        self._transport = None
        self._sftp = None
        self._stop_heartbeat = threading.Event()
        self._lost: str | None = None  # why the heartbeat gave the connection up
        self._silent_s = 0.0  # the silence it gave up after

    # connection

    def _where(self) -> str:
        t = self.target
        return f"{self.label} ({t.user}@{t.host}:{t.port})"

    def _connect(self):
        import paramiko

        from mlcloud.remote import keys

        t = self.target
        _quiet_paramiko()
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self._transport
            if self._lost is not None:  # the node went silent: say so, do not hang again
                raise SilentError(f"{self._where()}: {self._lost}", self._silent_s)
            # a bad key file or setting is the user's to fix, whatever the state of the network
            beat = (
                timeouts.seconds("SSH_HEARTBEAT_EVERY"),
                timeouts.seconds("SSH_HEARTBEAT_TIMEOUT"),
            )
            candidates = self._candidates()
            try:
                if t.proxy_command:
                    cmd = t.proxy_command.replace("%h", t.host).replace("%p", str(t.port))
                    sock = paramiko.ProxyCommand(cmd)
                else:
                    sock = socket.create_connection((t.host, t.port), timeout=CONNECT_TIMEOUT)
                heard = _Heard(sock)
                transport = paramiko.Transport(heard)
                # AES-GCM first where both ends have it: the cheapest cipher per byte synced
                opts = transport.get_security_options()
                gcm = tuple(
                    c
                    for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
                    if c in opts.ciphers
                )
                opts.ciphers = gcm + tuple(c for c in opts.ciphers if c not in gcm)
                transport.banner_timeout = CONNECT_TIMEOUT
                transport.start_client(timeout=CONNECT_TIMEOUT)
            except (OSError, paramiko.SSHException, EOFError) as e:
                raise UnreachableError(
                    f"{self._where()}: unreachable: {e or type(e).__name__}"
                ) from None
            try:
                server_key = transport.get_remote_server_key()
            except paramiko.SSHException as e:
                # "No existing session": the server dropped us right after the key exchange,
                # as a machine still booting or an sshd throttling new connections does
                transport.close()
                raise UnreachableError(
                    f"{self._where()}: connection dropped during the SSH handshake: {e}"
                ) from None
            try:
                keys.check_or_pin(t.pin_id, server_key, self.label)
                self._authenticate(transport, candidates)
                if self._on_connect is not None:
                    self._on_connect()
            except BaseException:
                transport.close()
                raise
            self._transport = transport
            threading.Thread(
                target=self._heartbeat,
                args=(transport, heard, self._stop_heartbeat, *beat),
                name=f"heartbeat-{self.label}",
                daemon=True,
            ).start()
            return transport

    def _heartbeat(
        self, transport, heard: _Heard, stop: threading.Event, every: float, timeout: float
    ) -> None:
        """Ask for an answer once the node has sent nothing for `every` s; close the connection
        once it has sent nothing for `timeout` s. One ask, not one per second: TCP resends it."""
        import paramiko

        every = min(every, timeout / 2)  # asked with time left to answer, whatever is set
        while not stop.is_set() and transport.is_active():
            quiet = time.monotonic() - heard.at
            if quiet >= timeout:
                self._silent_s = timeout
                self._lost = f"no answer for {timeout:g} s: the node or its network is gone"
                transport.close()  # wakes every operation waiting on it
                return
            if quiet < every:
                stop.wait(every - quiet)
                continue
            try:
                transport.open_session(timeout=timeout - quiet).close()
            except paramiko.ChannelException:
                pass  # refused (sshd's MaxSessions): an answer all the same
            except (paramiko.SSHException, OSError, EOFError):
                if stop.is_set() or not transport.is_active():
                    return  # closed on purpose, or the connection already reported its end
                # no answer in time; the loop judges by what was heard meanwhile, if anything
            stop.wait(0.05)  # an ask that failed at once is not repeated in a tight loop

    def _candidates(self) -> list | None:
        """The keys to offer (None: the agent's and the default ones), the fallback last; a
        bad key file is the user's to fix, whatever the state of the network."""
        t = self.target
        if t.fallback_identity is None:
            return [load_identity(t.identity_file)] if t.identity_file else None
        if t.identity_file and Path(t.identity_file).expanduser().is_file():
            first = [load_identity(t.identity_file)]
        elif t.identity_file:
            first = []  # gone (another home, or deleted since): the cluster's key answers
        else:
            first = default_identities()
        return first + [load_identity(t.fallback_identity)]

    def _authenticate(self, transport, candidates: list | None) -> None:
        import paramiko

        t = self.target
        if candidates is None:
            candidates = default_identities()
        if not candidates:
            raise RemoteError(
                f"{self._where()}: no SSH key to offer: pass --identity FILE, set "
                "ssh.identity_file, or load a key into ssh-agent"
            )
        for key in candidates:
            try:
                transport.auth_publickey(t.user, key)
                if transport.is_authenticated():
                    return
            except paramiko.AuthenticationException:
                continue
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise UnreachableError(
                    f"{self._where()}: connection lost during authentication: "
                    f"{e or type(e).__name__}"
                ) from None
        which = t.identity_file or "the agent's and default keys"
        raise RemoteError(
            f"{self._where()}: authentication refused for user {t.user!r} with "
            f"{which}; check the user and that the key is in authorized_keys"
        )

    def _sftp_client(self):
        import paramiko

        transport = self._connect()
        with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(transport)
                except (paramiko.SSHException, OSError, EOFError) as e:
                    raise self._lost_error(e) from None
            return self._sftp

    def _lost_error(self, e: BaseException) -> RemoteError:
        """The error for an operation that failed because the connection went away."""
        if self._lost is not None:
            return SilentError(f"{self._where()}: {self._lost}", self._silent_s)
        return LostError(f"{self._where()}: connection lost: {e or type(e).__name__}")

    def close(self) -> None:
        """Release the connection; never raises: closing one to a node that is gone (its proxy
        command ended, its socket dead) says goodbye into a broken pipe."""
        import paramiko

        self._stop_heartbeat.set()
        with self._lock:
            for end in (self._sftp, self._transport):
                try:
                    if end is not None:
                        end.close()
                except (paramiko.SSHException, OSError, EOFError):
                    pass
            self._sftp = self._transport = None
            self._stop_heartbeat = threading.Event()  # a later operation connects afresh
            self._lost = None

    # operations

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        on_line: Callable[[str], None] | None = None,
        stdin: bytes | Iterable[bytes] | None = None,
    ) -> RunResult:
        transport = self._connect()
        try:
            chan = transport.open_session(timeout=CONNECT_TIMEOUT)
            chan.exec_command(command)
            if stdin is not None:
                # a memoryview: paramiko's sendall slices what is left after every packet,
                # which on bytes copies the rest each time (quadratic in the payload)
                try:
                    for chunk in [stdin] if isinstance(stdin, bytes) else stdin:
                        chan.sendall(memoryview(chunk))
                    chan.shutdown_write()
                except OSError:
                    if not chan.exit_status_ready():
                        raise
                    # the command ended before reading it all (a sync refused or out of
                    # disk): its exit code and stderr, read below, say why
                except BaseException:
                    chan.close()  # the input could not be made: the command sees it end
                    raise
            out, err = io.BytesIO(), io.BytesIO()
            pending = b""

            def drain() -> None:
                nonlocal pending
                while chan.recv_ready():
                    data = chan.recv(1 << 16)
                    if on_line is None:
                        out.write(data)
                    else:
                        pending += data
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            on_line(line.decode(errors="replace"))
                while chan.recv_stderr_ready():
                    err.write(chan.recv_stderr(1 << 16))

            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                drain()
                # EOF is fed after the last data, so once it is seen one more drain gets all
                if (chan.exit_status_ready() and chan.eof_received) or chan.closed:
                    drain()
                    break
                if deadline is not None and time.monotonic() > deadline:
                    chan.close()
                    raise RemoteError(f"{self._where()}: command timed out after {timeout}s")
                select.select([chan], [], [], 0.2)
            if pending and on_line is not None:
                on_line(pending.decode(errors="replace"))
            code = chan.recv_exit_status()
            if code == -1:  # paramiko's "closed without an exit status": the connection died
                raise self._lost_error(EOFError("closed while running a command"))
            chan.close()
        except (OSError, EOFError) as e:
            raise self._lost_error(e) from None
        except Exception as e:
            import paramiko

            if isinstance(e, paramiko.SSHException):
                if self._lost is not None or not transport.is_active():
                    raise self._lost_error(e) from None
                raise RemoteError(f"{self._where()}: {e}") from None
            raise
        return RunResult(
            code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace")
        )

    @contextmanager
    def stream(self, command: str, stdin: bytes = b"") -> Iterator[_ChannelPipe]:
        import paramiko

        transport = self._connect()
        try:
            chan = transport.open_session(timeout=CONNECT_TIMEOUT)
            chan.exec_command(command)
            chan.sendall(memoryview(stdin))
            chan.shutdown_write()
            chan.settimeout(STREAM_IDLE_TIMEOUT)  # a live node that sends nothing must not hang us
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise self._lost_error(e) from None
        try:
            yield _ChannelPipe(chan, self)
        finally:
            chan.close()  # the command on the node sees its output closed, and ends

    def put(self, data: bytes, path: str, mode: int = 0o600) -> None:
        """Atomic write: the temp file gets its mode before any byte is written."""
        import paramiko

        sftp = self._sftp_client()
        tmp = f"{path}.mlcloud-tmp"
        try:
            with sftp.open(tmp, "wb") as f:
                sftp.chmod(tmp, mode)
                f.set_pipelined(True)
                f.write(data)
            sftp.posix_rename(tmp, path)
        except (OSError, EOFError, paramiko.SSHException) as e:
            if self._gone():
                raise self._lost_error(e) from None
            raise RemoteError(f"{self._where()}: cannot write {path}: {e}") from None

    def get(self, path: str) -> bytes | None:
        import paramiko

        sftp = self._sftp_client()
        try:
            with sftp.open(path, "rb") as f:
                f.prefetch()
                return f.read()
        except FileNotFoundError:
            return None
        except (OSError, EOFError, paramiko.SSHException) as e:
            if self._gone():
                raise self._lost_error(e) from None
            raise RemoteError(f"{self._where()}: cannot read {path}: {e}") from None

    def _gone(self) -> bool:
        t = self._transport
        return self._lost is not None or t is None or not t.is_active()

    def interactive(self, cwd: str) -> list[str]:
        """OpenSSH argv for a login shell in cwd, held to mlcloud's pinned host key."""
        from mlcloud.remote import keys
        from mlcloud.remote.shell import path_arg

        self.run("true")  # connect once with paramiko: pins the key if this is first contact
        t = self.target
        argv = [
            "ssh",
            "-t",
            "-p",
            str(t.port),
            "-l",
            t.user,
            "-o",
            f"UserKnownHostsFile={keys.known_hosts_path()}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"HostKeyAlias={t.pin_id}",
        ]
        if t.identity_file and Path(t.identity_file).expanduser().is_file():
            argv += ["-i", str(Path(t.identity_file).expanduser()), "-o", "IdentitiesOnly=yes"]
        elif t.fallback_identity:
            argv += ["-i", t.fallback_identity, "-o", "IdentitiesOnly=yes"]
        elif t.identity_file:
            argv += ["-i", str(Path(t.identity_file).expanduser()), "-o", "IdentitiesOnly=yes"]
        if t.proxy_command:
            argv += ["-o", f"ProxyCommand={t.proxy_command}"]
        return [*argv, t.host, f'cd {path_arg(cwd)} && exec "${{SHELL:-bash}}" -l']

    def sync(self, local_dir: Path, remote_dir: str) -> SyncStats:
        from mlcloud.remote import sync

        return sync.push(self, local_dir, remote_dir)


class _Heard:
    """A connection's socket that notes when the node last sent anything (monotonic `at`):
    the heartbeat's measure of silence. Everything else is the socket's own."""

    def __init__(self, sock):
        self._sock = sock
        self.at = time.monotonic()

    def recv(self, n: int) -> bytes:
        data = self._sock.recv(n)
        if data:
            self.at = time.monotonic()
        return data

    def close(self) -> None:
        """paramiko's own thread closes the socket as the transport ends: a proxy command that
        already exited is no error there (its close signals a process that is gone)."""
        with contextlib.suppress(ProcessLookupError):
            self._sock.close()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _ChannelPipe:
    """An SSH channel's stdout, read as it comes (SshTransport.stream)."""

    def __init__(self, chan, owner: SshTransport):
        self.chan, self.owner = chan, owner

    def read(self, n: int) -> bytes:
        try:
            data = self.chan.recv(n)
        except TimeoutError:
            raise RemoteError(
                f"{self.owner._where()}: sent nothing for {STREAM_IDLE_TIMEOUT:.0f} s; "
                "the command there is stalled"
            ) from None
        except (OSError, EOFError) as e:
            raise self.owner._lost_error(e) from None
        if not data and self.owner._gone():
            raise self.owner._lost_error(EOFError("closed while reading"))
        return data

    def finish(self) -> RunResult:
        code = self.chan.recv_exit_status()
        if code == -1:  # closed without an exit status: the connection died
            raise self.owner._lost_error(EOFError("closed while running a command"))
        err = io.BytesIO()
        while self.chan.recv_stderr_ready():
            err.write(self.chan.recv_stderr(1 << 16))
        return RunResult(code, "", err.getvalue().decode(errors="replace"))


def _quiet_paramiko() -> None:
    """paramiko logs its own tracebacks (a failing proxy command makes hundreds): our errors
    say what happened in one line, so its logger speaks only under --debug."""
    import logging
    import os

    log = logging.getLogger("paramiko")
    if os.environ.get("MLCLOUD_DEBUG") == "1":
        log.setLevel(logging.NOTSET)
    else:
        log.setLevel(logging.CRITICAL + 1)
