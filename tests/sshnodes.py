"""Real OpenSSH daemons as cluster nodes for tests and benchmarks (stdlib only).

Each node is one ``sshd`` listening on its own loopback address (127.0.0.2, 127.0.0.3, ...;
the block is ``net``, default $SSHNODES_NET or 127.0.0: parallel test workers take one each),
all on one shared high port, with its own host key, pid file and log under ``workdir``. The
client logs in with one ed25519 key as the current user (root here; any user works, sshd then
only lets that user in).

    with SshNodes(3, tmp_path / "ssh") as nodes:
        subprocess.run(nodes.ssh_argv(0, "true"), check=True)
        nodes.kill(1)  # node lost: its sshd and every session process, SIGKILL

Remote commands see ``PATH=env_path`` (default: the directory of this interpreter, then the
usual system PATH), so ``python3`` there is this venv's python. For that to win, sessions get
``SHLVL=1`` by default, which makes bash skip ~/.bashrc (bash only sources it for ssh when it is
a top-level shell); root's ~/.bashrc here prepends pyenv shims and costs ~100 ms per command.
Pass ``skip_rc=False`` to get the real-machine behaviour (rc files run, PATH as they leave it);
``nodes.python`` (absolute path of this interpreter) works either way.

Every session process also carries ``SSHNODES_TAG=<instance token>:<node index>`` in its
environment, which is how ``kill``/``stop`` find session processes that left sshd's process tree
(double-forked daemons) as well as the ones still under it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TAG_VAR = "SSHNODES_TAG"
NET_VAR = "SSHNODES_NET"  # the first three octets of the nodes' loopback addresses


def _find_exe(name: str, *extra: str) -> str:
    found = shutil.which(name) or next((p for p in extra if os.access(p, os.X_OK)), None)
    if not found:
        raise RuntimeError(
            f"{name} not found: install openssh-server (apt-get install -y openssh-server)"
        )
    return found


@dataclass(frozen=True)
class SshNode:
    host: str
    port: int
    user: str
    pid: int  # the node's listening sshd

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class SshNodesError(RuntimeError):
    pass


class SshNodes:
    """K sshd daemons on 127.0.0.2.. as a context manager (``start``/``stop`` also usable)."""

    def __init__(
        self,
        count: int,
        workdir: Path,
        env_path: str | None = None,
        *,
        skip_rc: bool = True,
        first_host: int = 2,
        start_timeout: float = 5.0,
        extra_config: tuple[str, ...] = (),
        extra_env: tuple[str, ...] = (),
        net: str | None = None,
    ):
        if count < 1 or first_host + count - 1 > 254 or first_host < 2:
            raise ValueError("need 1..253 nodes on 127.0.0.2..127.0.0.254")
        net = net or os.environ.get(NET_VAR) or "127.0.0"
        self.count = count
        self.workdir = Path(workdir).absolute()
        self.python = sys.executable  # not resolved: a venv's python is a symlink into it
        self.env_path = env_path or f"{os.path.dirname(sys.executable)}:{SYSTEM_PATH}"
        self.skip_rc = skip_rc
        self.extra_config = extra_config  # more sshd_config lines, e.g. a ForceCommand
        self.extra_env = extra_env  # more NAME=VALUE for every session
        self.start_timeout = start_timeout
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.hosts = [f"{net}.{first_host + i}" for i in range(count)]
        self.port = 0
        self.nodes: list[SshNode] = []
        self.client_key = self.workdir / "client_ed25519"
        self.client_pub = ""
        self.known_hosts = self.workdir / "known_hosts"
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._procs: list[subprocess.Popen | None] = [None] * count
        self._sshd = _find_exe("sshd", "/usr/sbin/sshd")
        self._keygen = _find_exe("ssh-keygen")

    # ---- paths -------------------------------------------------------------------------

    def node_dir(self, index: int) -> Path:
        return self.workdir / f"node{index}"

    def config_path(self, index: int) -> Path:
        return self.node_dir(index) / "sshd_config"

    def log_path(self, index: int) -> Path:
        return self.node_dir(index) / "sshd.log"

    def host_key_path(self, index: int) -> Path:
        return self.node_dir(index) / "ssh_host_ed25519_key"

    def pid_path(self, index: int) -> Path:
        return self.node_dir(index) / "sshd.pid"

    def host_public_key(self, index: int) -> str:
        """The node's host key as ``ssh-ed25519 AAAA...`` (no comment)."""
        text = self.host_key_path(index).with_suffix(".pub").read_text().split()
        return f"{text[0]} {text[1]}"

    def tag(self, index: int) -> str:
        return f"{self.token}:{index}"

    # ---- client helpers ----------------------------------------------------------------

    def ssh_options(self) -> list[str]:
        """OpenSSH client options that ignore ~/.ssh and trust exactly these nodes' keys."""
        return [
            "-F", "/dev/null",
            "-i", str(self.client_key),
            "-p", str(self.port),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=5",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def ssh_argv(self, index: int, *command: str) -> list[str]:
        node = self.nodes[index]
        return ["ssh", *self.ssh_options(), f"{node.user}@{node.host}", *command]

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> SshNodes:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if os.getuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.client_key.exists():
            self._keygen_to(self.client_key, "sshnodes-client")
        self.client_pub = self.client_key.with_suffix(".pub").read_text().strip()
        (self.workdir / "authorized_keys").write_text(self.client_pub + "\n")
        for i in range(self.count):
            self.node_dir(i).mkdir(exist_ok=True)
            if not self.host_key_path(i).exists():
                self._keygen_to(self.host_key_path(i), f"sshnodes-node{i}")
        self.nodes = [SshNode(h, 0, self.user, 0) for h in self.hosts]
        last: Exception | None = None
        for _ in range(3):  # another process may take the port between the check and bind
            self.port = self._free_port()
            try:
                for i in range(self.count):
                    self._spawn(i)
                for i in range(self.count):
                    self._await_listening(i)
                self._write_known_hosts()
                return
            except SshNodesError as e:
                last = e
                self.stop()
                if "Address already in use" not in str(e):
                    raise
        raise last  # type: ignore[misc]

    def stop(self) -> None:
        """SIGTERM every node's sshd and session processes, then SIGKILL what is left."""
        for i in range(len(self.nodes)):
            self._terminate(i, graceful=True)

    def reset(self) -> None:
        """Back to as started, for the next user of a kept fleet: every session process ended
        (SIGTERM, then SIGKILL), a node that was stopped or killed started again (same port
        and host key, or a new port if that one was taken meanwhile), the authorized keys the
        workdir fan-out writes per node removed."""
        down = []
        for i in range(self.count):
            proc = self._procs[i]
            if proc is None or proc.poll() is not None:
                down.append(i)
                continue
            _end_sessions(proc.pid, self.tag(i))
        for i in range(self.count):
            own = self.node_dir(i) / "authorized_keys"
            if own.is_dir() and not own.is_symlink():
                shutil.rmtree(own)
            else:
                own.unlink(missing_ok=True)
        if not down:
            return
        try:
            for i in down:
                self.restart(i)
            self._write_known_hosts()
        except SshNodesError:
            self.stop()
            self.start()

    def kill(self, index: int) -> None:
        """Node lost: SIGKILL node i's sshd and every process spawned through it, at once."""
        self._terminate(index, graceful=False)

    def restart(self, index: int) -> SshNode:
        """Stop node i (if up) and start it again, same host key and port."""
        self._terminate(index, graceful=True)
        self._spawn(index)
        self._await_listening(index)
        return self.nodes[index]

    def restart_with_new_host_key(self, index: int) -> SshNode:
        """Regenerate node i's host key and restart it. ``known_hosts`` gets the new key."""
        self._terminate(index, graceful=True)
        for p in (self.host_key_path(index), self.host_key_path(index).with_suffix(".pub")):
            p.unlink(missing_ok=True)
        self._keygen_to(self.host_key_path(index), f"sshnodes-node{index}")
        self._spawn(index)
        self._await_listening(index)
        self._write_known_hosts()
        return self.nodes[index]

    def pids(self, index: int) -> set[int]:
        """Live processes of node i: its sshd, sshd's descendants, and tagged session processes."""
        proc = self._procs[index]
        roots = {self.nodes[index].pid} if self.nodes and self.nodes[index].pid else set()
        if proc is not None:
            roots.add(proc.pid)
        config = str(self.config_path(index)).encode()
        return _node_processes({p for p in roots if config in _cmdline(p)}, self.tag(index))

    # ---- internals ---------------------------------------------------------------------

    def _keygen_to(self, path: Path, comment: str) -> None:
        subprocess.run(
            [self._keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
        os.chmod(path, 0o600)

    def _config(self, index: int) -> str:
        # each node its own authorized keys file beside the shared one, as separate machines
        # have: where the workdir fan-out lets the cluster's peer key in
        own_keys = self.node_dir(index) / "authorized_keys"
        setenv = [
            f"PATH={self.env_path}",
            f"{TAG_VAR}={self.tag(index)}",
            f"MLCLOUD_AUTHORIZED_KEYS={own_keys}",
            *self.extra_env,
        ]
        if self.skip_rc:
            setenv.append("SHLVL=1")  # bash sees itself nested and skips ~/.bashrc
        lines = [
            f"ListenAddress {self.hosts[index]}",
            f"Port {self.port}",
            f"HostKey {self.host_key_path(index)}",
            f"PidFile {self.pid_path(index)}",
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'} {own_keys}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "ClientAliveInterval 10",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "PermitUserEnvironment no",
            "SetEnv " + " ".join(f'"{kv}"' for kv in setenv),
            *self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    def _spawn(self, index: int) -> None:
        cfg = self.config_path(index)
        cfg.write_text(self._config(index))
        self.pid_path(index).unlink(missing_ok=True)
        log = self.log_path(index)
        with log.open("a") as f:
            f.write(f"--- sshnodes: starting node {index} on {self.hosts[index]}:{self.port}\n")
        # -D: no daemonizing, so the pid is known at once and we reap it (no zombie left);
        # its own session so that signals to the test's process group do not reach it.
        proc = subprocess.Popen(
            [self._sshd, "-D", "-f", str(cfg), "-E", str(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs[index] = proc
        self.nodes[index] = SshNode(self.hosts[index], self.port, self.user, proc.pid)

    def _await_listening(self, index: int) -> None:
        host, proc = self.hosts[index], self._procs[index]
        assert proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                raise SshNodesError(
                    f"sshd for node {index} ({host}:{self.port}) exited with {proc.returncode}"
                    f"\n{self._log_tail(index)}"
                )
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((host, self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise SshNodesError(
                    f"sshd for node {index} not accepting on {host}:{self.port} after "
                    f"{self.start_timeout:.0f} s\n{self._log_tail(index)}"
                )
            time.sleep(0.02)

    def _log_tail(self, index: int, lines: int = 20) -> str:
        try:
            text = self.log_path(index).read_text(errors="replace").splitlines()
        except OSError:
            return "(no sshd log)"
        return "sshd log tail:\n" + "\n".join("  " + t for t in text[-lines:])

    def _free_port(self) -> int:
        for _ in range(50):
            with socket.socket() as s:
                s.bind((self.hosts[0], 0))
                port = s.getsockname()[1]
            if all(_can_bind(h, port) for h in self.hosts):
                return port
        raise SshNodesError("no port free on all node addresses")

    def _write_known_hosts(self) -> None:
        lines = []
        for i, h in enumerate(self.hosts):
            if self.host_key_path(i).with_suffix(".pub").exists():
                lines.append(f"[{h}]:{self.port} {self.host_public_key(i)}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def _terminate(self, index: int, graceful: bool) -> None:
        if index >= len(self.nodes):
            return
        proc = self._procs[index]
        roots = {self.nodes[index].pid} if self.nodes[index].pid else set()
        with contextlib.suppress(OSError, ValueError):
            roots.add(int(self.pid_path(index).read_text().split()[0]))
        if proc is not None:
            roots.add(proc.pid)
        # a pid of a node that died may be another process's by now (pids wrap at 32768):
        # only this node's sshd, found by its config on its command line, is a root
        config = str(self.config_path(index)).encode()
        roots = {p for p in roots if _alive(p) and config in _cmdline(p)}
        tag = self.tag(index)
        if graceful:
            # Sessions first, so the listener reaps its own children (no orphans left for
            # PID 1), then the listener; SIGKILL below for whatever ignored SIGTERM.
            for group in ("sessions", "listener"):
                deadline = time.monotonic() + (2.0 if group == "sessions" else 1.0)
                victims = _node_processes(roots, tag)
                if group == "sessions":
                    victims -= roots
                _signal_all(victims, signal.SIGTERM)
                while victims and time.monotonic() < deadline:
                    time.sleep(0.02)
                    if proc is not None:
                        proc.poll()
                    victims = {p for p in victims if _alive(p)}
        _kill_tree(roots, tag)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.pid_path(index).unlink(missing_ok=True)


# ---- /proc helpers ---------------------------------------------------------------------------


def _can_bind(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _has_tag(pid: int, tag: str) -> bool:
    want = f"{TAG_VAR}={tag}".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return want in f.read().split(b"\0")
    except OSError:
        return False


def _node_processes(roots: set[int], tag: str) -> set[int]:
    """Live roots, their descendants, and every process carrying the node's tag."""
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        children.setdefault(st[1], []).append(pid)
        if pid != os.getpid() and _has_tag(pid, tag):
            found.add(pid)
    stack = list(found | {p for p in roots if _alive(p)})
    found = set(stack)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return found


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _end_sessions(listener: int, tag: str) -> None:
    """End every process of a node but its listening sshd: SIGTERM, then SIGKILL after 2 s."""
    victims = _node_processes({listener}, tag) - {listener}
    _signal_all(victims, signal.SIGTERM)
    deadline = time.monotonic() + 2.0
    while victims and time.monotonic() < deadline:
        time.sleep(0.02)
        victims = {p for p in victims if _alive(p)}
    stopped: set[int] = set()
    for _ in range(20):
        new = _node_processes({listener}, tag) - {listener} - stopped
        if not new:
            break
        _signal_all(new, signal.SIGSTOP)
        stopped |= new
    _signal_all(stopped, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p) for p in stopped):
        time.sleep(0.01)


def _kill_tree(roots: set[int], tag: str) -> None:
    """Freeze the whole set (so nothing forks away meanwhile), then SIGKILL it and wait."""
    stopped: set[int] = set()
    for _ in range(20):
        new = _node_processes(roots | stopped, tag) - stopped
        if not new:
            break
        _signal_all(new, signal.SIGSTOP)
        stopped |= new
    _signal_all(stopped, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p) for p in stopped):
        time.sleep(0.01)
