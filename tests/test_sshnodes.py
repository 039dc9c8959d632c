"""The SshNodes helper: real sshd daemons on 127.0.0.2.. (a block per xdist worker) that OpenSSH
and paramiko can use."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time

import paramiko
import pytest
from conftest import SSH_NET as NET
from sshnodes import SshNodes

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) or not shutil.which("ssh"),
        reason="needs openssh-server and openssh-client (apt-get install -y openssh-server)",
    ),
]


def sshd_pids_with(config_prefix: str) -> list[int]:
    """Live processes whose command line mentions a config under config_prefix."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if config_prefix in cmd:
            found.append(int(entry))
    return found


def paramiko_client(nodes: SshNodes, index: int) -> paramiko.SSHClient:
    node = nodes.nodes[index]
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key_type, key_b64 = nodes.host_public_key(index).split()
    client.get_host_keys().add(
        f"[{node.host}]:{node.port}", key_type, paramiko.Ed25519Key(data=_b64(key_b64))
    )
    client.connect(
        node.host,
        port=node.port,
        username=node.user,
        key_filename=str(nodes.client_key),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return client


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def run(client: paramiko.SSHClient, command: str) -> tuple[int, str]:
    _, stdout, _ = client.exec_command(command, timeout=30)
    out = stdout.read().decode()
    return stdout.channel.recv_exit_status(), out


def test_three_nodes_openssh_paramiko_and_clean_stop(tmp_path):
    workdir = tmp_path / "ssh"
    nodes = SshNodes(3, workdir)
    with nodes:
        assert [n.host for n in nodes.nodes] == [f"{NET}.2", f"{NET}.3", f"{NET}.4"]
        assert len({n.port for n in nodes.nodes}) == 1
        assert oct(nodes.client_key.stat().st_mode & 0o777) == "0o600"
        assert nodes.client_pub.startswith("ssh-ed25519 ")
        for i, node in enumerate(nodes.nodes):
            assert node.target == f"{node.user}@{NET}.{i + 2}:{node.port}"
            # Plain OpenSSH, the way the brief's users would type it.
            argv = [
                "ssh", "-F", "/dev/null",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-i", str(nodes.client_key), "-p", str(node.port),
                f"{node.user}@{node.host}", "true",
            ]  # fmt: skip
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            # The helper's argv checks the host key strictly against its known_hosts.
            r = subprocess.run(
                nodes.ssh_argv(i, "echo", "$SSHNODES_TAG"),
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == nodes.tag(i)

            client = paramiko_client(nodes, i)
            try:
                code, out = run(client, "true")
                assert code == 0
                # Remote sessions find this venv's python first on PATH.
                code, out = run(client, "command -v python3; echo $PATH")
                assert code == 0
                first, path = out.split("\n")[:2]
                assert path.split(":")[0] == os.path.dirname(sys.executable)
                assert first == os.path.join(os.path.dirname(sys.executable), "python3")
            finally:
                client.close()

        # A session that is still running when we stop must not survive it.
        client = paramiko_client(nodes, 0)
        client.exec_command("sleep 300")
        time.sleep(0.3)
        assert nodes.pids(0) - {n.pid for n in nodes.nodes}  # sessions are there
        assert sshd_pids_with(str(workdir))
    client.close()
    assert sshd_pids_with(str(workdir)) == []
    assert all(nodes.pids(i) == set() for i in range(3))


def test_restart_with_new_host_key_changes_presented_key(tmp_path):
    with SshNodes(2, tmp_path / "ssh") as nodes:
        old = nodes.host_public_key(1)
        old_pid = nodes.nodes[1].pid
        node = nodes.restart_with_new_host_key(1)
        assert node.pid != old_pid and node.port == nodes.port
        new = nodes.host_public_key(1)
        assert new != old

        presented = subprocess.run(
            ["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", str(node.port), node.host],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        assert " ".join(presented[1:3]) == new

        # paramiko trusting the old key refuses; trusting the new one connects.
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.get_host_keys().add(
            f"[{node.host}]:{node.port}",
            "ssh-ed25519",
            paramiko.Ed25519Key(data=_b64(old.split()[1])),
        )
        with pytest.raises(paramiko.BadHostKeyException):
            client.connect(
                node.host,
                port=node.port,
                username=node.user,
                key_filename=str(nodes.client_key),
                look_for_keys=False,
                allow_agent=False,
                timeout=10,
            )
        client.close()
        paramiko_client(nodes, 1).close()
        # The other node is untouched and the helper's known_hosts follows the change.
        r = subprocess.run(nodes.ssh_argv(1, "true"), capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(nodes.ssh_argv(0, "true"), capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr


def test_kill_takes_sessions_with_it(tmp_path):
    with SshNodes(2, tmp_path / "ssh") as nodes:
        # A session that double-forks away from sshd's tree is found by its tag.
        client = paramiko_client(nodes, 0)
        client.exec_command("(setsid sleep 301 </dev/null >/dev/null 2>&1 &); sleep 300")
        time.sleep(0.5)
        before = nodes.pids(0)
        assert len(before) >= 3
        nodes.kill(0)
        assert all(not os.path.exists(f"/proc/{p}/cmdline") or _dead(p) for p in before)
        client.close()
        # Node 1 still serves; node 0 can come back.
        assert subprocess.run(nodes.ssh_argv(1, "true"), timeout=30).returncode == 0
        nodes.restart(0)
        assert subprocess.run(nodes.ssh_argv(0, "true"), timeout=30).returncode == 0


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_reset_ends_sessions_and_brings_lost_nodes_back(tmp_path):
    """What a kept fleet does between tests: no session outlives reset, a stopped or killed
    node serves again on its port, the fan-out's per-node keys are gone."""
    with SshNodes(2, tmp_path / "ssh") as nodes:
        client = paramiko_client(nodes, 0)
        client.exec_command("(setsid sleep 302 </dev/null >/dev/null 2>&1 &); sleep 300")
        (nodes.node_dir(0) / "authorized_keys").write_text("a peer key\n")
        (nodes.node_dir(1) / "authorized_keys").mkdir()
        time.sleep(0.5)
        sessions = nodes.pids(0) - {nodes.nodes[0].pid}
        assert sessions
        nodes.kill(1)
        port = nodes.port
        nodes.reset()
        client.close()
        assert all(not os.path.exists(f"/proc/{p}/cmdline") or _dead(p) for p in sessions)
        assert nodes.pids(0) == {nodes.nodes[0].pid}  # the listener alone
        assert not (nodes.node_dir(0) / "authorized_keys").exists()
        assert not (nodes.node_dir(1) / "authorized_keys").exists()
        assert nodes.port == port
        for i in (0, 1):
            r = subprocess.run(nodes.ssh_argv(i, "true"), capture_output=True, timeout=30)
            assert r.returncode == 0, r.stderr
