"""Shared fixtures: every test gets its own MLCLOUD_HOME, so none touches real state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MLCLOUD = str(Path(sys.executable).parent / "mlcloud")


@pytest.fixture(autouse=True)
def mlcloud_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "mlcloud-home"
    monkeypatch.setenv("MLCLOUD_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    return home


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """The real `mlcloud` process, no terminal, environment of the test (MLCLOUD_HOME)."""
    return subprocess.run(
        [MLCLOUD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ),
        **kw,
    )


def tagged_pids(prefix: str) -> list[int]:
    """Live processes whose MLCLOUD_PROC_TAG starts with prefix (how node_ctl finds them)."""
    want = f"MLCLOUD_PROC_TAG={prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if any(e.startswith(want) for e in env):
            found.append(int(entry))
    return found


@pytest.fixture
def make_ssh_nodes(tmp_path):
    """Start K real OpenSSH daemons on 127.0.0.2.. as nodes; all stopped (by PID) after the test."""
    from sshnodes import SshNodes

    started: list[SshNodes] = []

    def make(count: int) -> SshNodes:
        nodes = SshNodes(count, tmp_path / f"sshd{len(started)}")
        nodes.start()
        started.append(nodes)
        return nodes

    yield make
    # whatever a failed test left on the nodes (they live in this user's real home) goes now
    run_cli("down", "--all", "--yes", "--purge")
    for nodes in started:
        nodes.stop()


def ssh_up_args(nodes, name: str) -> list[str]:
    return [
        "up",
        name,
        "--hosts",
        ",".join(n.target for n in nodes.nodes),
        "--identity",
        str(nodes.client_key),
    ]
