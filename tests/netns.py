"""One sshd node in a network namespace of its own, joined to this one by a veth pair, so a
test can cut it off silently: `cut()` sets the link down inside the namespace, and packets to
it are then dropped without any reset, as when a spot instance is reclaimed or a link fails.

Needs root and iproute2. Addresses come from 198.18.0.0/15 (reserved for benchmarks, never
routed): the namespace is reachable from this machine only. Everything is removed on exit.
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


def available() -> bool:
    return os.getuid() == 0 and shutil.which("ip") is not None and os.path.exists("/usr/sbin/sshd")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class NsNode:
    """`with NsNode(workdir) as node:` node.host, node.port, node.client_key, node.cut()."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).absolute()
        token = secrets.token_hex(3)
        self.ns = f"mlct-{token}"
        self.outer, self.inner = f"mlo{token}", f"mli{token}"
        third = int(token[:2], 16)  # spreads parallel tests over 198.18.0-255.x
        self.subnet = f"198.18.{third}.0/30"
        self.gateway, self.host = f"198.18.{third}.1", f"198.18.{third}.2"
        self.port = 22
        self.client_key = self.workdir / "client_ed25519"
        self._sshd: subprocess.Popen | None = None

    def __enter__(self) -> NsNode:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        host_key = self.workdir / "host_ed25519"
        for key in (self.client_key, host_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
                capture_output=True,
            )
        (self.workdir / "authorized_keys").write_text(
            self.client_key.with_suffix(".pub").read_text()
        )
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        _ip("link", "set", self.inner, "netns", self.ns)
        _ip("addr", "add", f"{self.gateway}/30", "dev", self.outer)
        _ip("link", "set", self.outer, "up")
        _ip("-n", self.ns, "addr", "add", f"{self.host}/30", "dev", self.inner)
        _ip("-n", self.ns, "link", "set", self.inner, "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        config = self.workdir / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.host}",
                    f"Port {self.port}",
                    f"HostKey {host_key}",
                    f"PidFile {self.workdir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
                    "UsePAM no",
                    "StrictModes no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "Subsystem sftp internal-sftp",
                    "UseDNS no",
                    f'SetEnv "PATH={os.path.dirname(sys.executable)}:{SYSTEM_PATH}" "SHLVL=1"',
                ]
            )
            + "\n"
        )
        self._sshd = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "/usr/sbin/sshd", "-D", "-f", str(config), "-E",
             str(self.workdir / "sshd.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            probe = subprocess.run(
                ["ip", "netns", "exec", self.ns, "ss", "-Hltn", f"sport = :{self.port}"],
                capture_output=True,
                text=True,
            )
            if self.host in probe.stdout:
                return
            if self._sshd.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd in {self.ns} did not start:\n{log}")
            time.sleep(0.05)

    def cut(self) -> None:
        """Drop every packet to and from the node from now on, silently (no RST, no ICMP)."""
        _ip("-n", self.ns, "link", "set", self.inner, "down")

    def pids(self) -> list[int]:
        """Every process living in the namespace (sshd and what it started)."""
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._sshd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._sshd.wait(timeout=5)
        for args in (("link", "del", self.outer), ("netns", "del", self.ns)):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip(*args)
