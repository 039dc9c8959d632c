"""K sshd nodes, each in a network namespace of its own, on one bridge: every node has its own
address in one subnet, so the nodes reach each other (rendezvous, gloo), and a test can kill
one whole (`kill(i)`: SIGKILL to every process in its namespace) or cut it off silently
(`cut(i)`: its link goes down, packets are dropped without a reset, as when a spot instance is
reclaimed or a link fails) without touching the rest.

Needs root and iproute2. Addresses come from 198.18.0.0/15 (reserved for benchmarks, never
routed): reachable from this machine only; a /24 no other bridge here has (xdist workers draw
from their own parts of it). One client key logs in everywhere. Everything is
removed on exit.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sshnodes import SYSTEM_PATH

PORT = 22


def available() -> bool:
    return os.getuid() == 0 and shutil.which("ip") is not None and os.path.exists("/usr/sbin/sshd")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def _free_net(worker: int | None) -> str:
    """A /24 of 198.18.0.0/15 (512 of them) that no address of this machine is in yet: xdist
    worker N draws from its own 32 (so a run's workers never share one), other runs' bridges
    are seen and passed over."""
    import random

    nets = [f"198.{18 + k // 256}.{k % 256}" for k in range(512)]
    if worker is not None:
        nets = nets[worker * 32 : worker * 32 + 32]
    random.shuffle(nets)
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    taken = out.stdout
    for net in nets:
        if f" {net}." not in taken:
            return net
    return nets[0]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


class NsBridge:
    """`with NsBridge(k, workdir) as b:` b.hosts, b.targets, b.client_key, b.subnet,
    b.kill(i), b.cut(i), b.pids(i)."""

    def __init__(self, count: int, workdir: Path):
        self.workdir = Path(workdir).absolute()
        token = secrets.token_hex(3)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        if worker[2:].isdigit():  # gwN: its own first hex digit, so workers never share a name
            token = f"{int(worker[2:]) % 16:x}{token[1:]}"
        self.token = token
        self.bridge = f"mlb{token}"
        net = _free_net(int(worker[2:]) % 16 if worker[2:].isdigit() else None)
        self.subnet = f"{net}.0/24"
        self.gateway = f"{net}.1"
        self.hosts = [f"{net}.{i + 2}" for i in range(count)]
        self.namespaces = [f"mlcb-{token}-{i}" for i in range(count)]
        self.client_key = self.workdir / "client_ed25519"
        self._sshd: list[subprocess.Popen] = []

    def __enter__(self) -> NsBridge:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def targets(self) -> list[str]:
        return [f"root@{h}:{PORT}" for h in self.hosts]

    def _links(self, i: int) -> tuple[str, str]:
        """(outer, inner) ends of node i's veth pair; the inner one lives in its namespace."""
        return f"mbo{self.token}{i}", f"mbi{self.token}{i}"

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        _keygen(self.client_key)
        (self.workdir / "authorized_keys").write_text(
            self.client_key.with_suffix(".pub").read_text()
        )
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, host) in enumerate(zip(self.namespaces, self.hosts, strict=True)):
            outer, inner = self._links(i)
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{host}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self._sshd.append(self._spawn(i))
        for i in range(len(self.hosts)):
            self._await(i)

    def _spawn(self, i: int) -> subprocess.Popen:
        d = self.workdir / f"node{i}"
        d.mkdir(exist_ok=True)
        host_key = d / "host_ed25519"
        _keygen(host_key)
        config = d / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.hosts[i]}",
                    f"Port {PORT}",
                    f"HostKey {host_key}",
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "UseDNS no",
                    "MaxStartups 100",
                    "SetEnv " + " ".join(f'"{kv}"' for kv in self._session_env()),
                ]
            )
            + "\n"
        )
        return subprocess.Popen(
            ["ip", "netns", "exec", self.namespaces[i], "/usr/sbin/sshd", "-D", "-f",
             str(config), "-E", str(d / "sshd.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def _session_env(self) -> list[str]:
        env = [f"PATH={os.path.dirname(sys.executable)}:{SYSTEM_PATH}", "SHLVL=1"]
        # the torchrun stand-in where the test has it (conftest), as its local nodes do
        standin = os.environ.get("MLCLOUD_TEST_TORCHRUN")
        return env + ([f"MLCLOUD_TEST_TORCHRUN={standin}"] if standin else [])

    def _await(self, i: int) -> None:
        deadline = time.monotonic() + 10
        while True:
            listening = subprocess.run(
                ["ip", "netns", "exec", self.namespaces[i], "ss", "-Hltn", f"sport = :{PORT}"],
                capture_output=True,
                text=True,
            )
            if self.hosts[i] in listening.stdout:
                return
            if self._sshd[i].poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / f"node{i}" / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd in {self.namespaces[i]} did not start:\n{log}")
            time.sleep(0.05)

    def pids(self, i: int) -> list[int]:
        """Every process living in node i's namespace (sshd and what it started)."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.namespaces[i]], capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]

    def kill(self, i: int) -> None:
        """kill -9 everything on node i: its sshd, the job, anything it left running."""
        for _ in range(5):
            pids = self.pids(i)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def cut(self, i: int) -> None:
        """Drop every packet to and from node i from now on, silently (no RST, no ICMP)."""
        _ip("-n", self.namespaces[i], "link", "set", self._links(i)[1], "down")

    def close(self) -> None:
        for i in range(len(self.namespaces)):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.kill(i)
        for p in self._sshd:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for i, ns in enumerate(self.namespaces):
            for args in (("link", "del", self._links(i)[0]), ("netns", "del", ns)):
                with contextlib.suppress(subprocess.CalledProcessError):
                    _ip(*args)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.bridge)
