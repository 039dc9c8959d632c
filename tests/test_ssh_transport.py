"""The paramiko transport against real OpenSSH daemons: parallel exec and put, host-key pinning,
errors that name the node and the cause, key files' modes."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from mlcloud.errors import MlcloudError
from mlcloud.parallel import fan_out
from mlcloud.remote import keys
from mlcloud.remote.ssh import SshTarget, SshTransport
from mlcloud.remote.transport import RemoteError


def transports(nodes, **kw) -> list[SshTransport]:
    return [
        SshTransport(
            SshTarget(
                host=n.host, port=n.port, user=n.user, identity_file=str(nodes.client_key), **kw
            ),
            f"node{i}",
        )
        for i, n in enumerate(nodes.nodes)
    ]


def test_parallel_exec_and_put_on_4_nodes(make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(4)
    ts = transports(nodes)
    try:
        out = fan_out(lambda t: t.run("echo $SSH_CONNECTION; echo err >&2; exit 3"), ts)
        assert [r.exit_code for r in out] == [3] * 4
        assert [r.stdout.split()[2] for r in out] == [n.host for n in nodes.nodes]
        assert all(r.stderr == "err\n" for r in out)
        target = tmp_path / "put"
        target.mkdir()
        fan_out(lambda i: ts[i].put(f"secret {i}".encode(), f"{target}/f{i}"), list(range(4)))
        for i in range(4):
            f = target / f"f{i}"
            assert f.read_text() == f"secret {i}"
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        # one connection per node, reused
        first = [t._transport for t in ts]
        fan_out(lambda t: t.run("true"), ts)
        assert [t._transport for t in ts] == first
        lines: list[str] = []
        r = ts[0].run("printf 'a\\nb\\nno-newline'", on_line=lines.append)
        assert r.exit_code == 0 and lines == ["a", "b", "no-newline"]
        assert ts[0].get(f"{target}/f0") == b"secret 0" and ts[0].get(f"{target}/nope") is None
    finally:
        for t in ts:
            t.close()


def test_host_key_pinned_then_change_refused(make_ssh_nodes):
    nodes = make_ssh_nodes(1)
    t = transports(nodes)[0]
    assert t.run("true").exit_code == 0
    t.close()
    pinned = keys.known_hosts_path().read_text()
    assert f"[{nodes.nodes[0].host}]:{nodes.nodes[0].port}" in pinned
    assert stat.S_IMODE(keys.known_hosts_path().stat().st_mode) == 0o600
    nodes.restart_with_new_host_key(0)
    t = transports(nodes)[0]
    with pytest.raises(keys.HostKeyChanged) as e:
        t.run("true")
    message = str(e.value)
    assert "changed" in message and "ssh-keygen -R" in message and "\n" not in message
    assert keys.known_hosts_path().read_text() == pinned  # never re-pinned silently


def test_auth_refused_names_node_and_user(make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(1)
    wrong, _ = keys.ensure_cluster_key("someone-else")
    n = nodes.nodes[0]
    t = SshTransport(SshTarget(n.host, n.port, n.user, identity_file=str(wrong)), "node0")
    with pytest.raises(RemoteError, match=r"node0 \(.*\): authentication refused for user"):
        t.run("true")


def test_unreachable_names_node(make_ssh_nodes):
    nodes = make_ssh_nodes(1)
    port = nodes.nodes[0].port
    nodes.kill(0)
    t = SshTransport(
        SshTarget(nodes.hosts[0], port, "root", identity_file=str(nodes.client_key)), "node0"
    )
    with pytest.raises(RemoteError, match=rf"node0 \(root@{nodes.hosts[0]}:\d+\): unreachable"):
        t.run("true")


def test_missing_identity_file_is_a_usage_error(tmp_path):
    from mlcloud.errors import UsageError

    t = SshTransport(SshTarget("127.0.0.2", 22, "root", identity_file=str(tmp_path / "no")), "n")
    with pytest.raises(UsageError, match="not found"):
        t.run("true")


def test_proxy_command_routes_to_the_node(make_ssh_nodes):
    # what the cloud tests use: a node known by one address, reached through another
    nodes = make_ssh_nodes(1)
    n = nodes.nodes[0]
    relay = Path(__file__).parent / "tcp_relay.py"
    proxy = f"{sys.executable} {relay} {n.host} %p"
    t = SshTransport(
        SshTarget(
            "10.0.0.99",
            n.port,
            n.user,
            identity_file=str(nodes.client_key),
            proxy_command=proxy,
            host_key_id="i-0123456789",
        ),
        "node0",
    )
    try:
        r = t.run("echo $SSH_CONNECTION")
        assert r.exit_code == 0 and r.stdout.split()[2] == n.host
        assert "i-0123456789 " in keys.known_hosts_path().read_text()
    finally:
        t.close()


def test_closing_a_connection_whose_proxy_ended_does_not_raise(make_ssh_nodes):
    """A node gone behind a bastion: its proxy command exits, and paramiko's goodbye goes into
    a broken pipe. The controller closes such a node's connection as it replaces it; a raise
    there ended the controller (seen on the fake clouds: no replacement)."""
    nodes = make_ssh_nodes(1)
    n = nodes.nodes[0]
    relay = Path(__file__).parent / "tcp_relay.py"
    t = SshTransport(
        SshTarget(
            "10.0.0.98",
            n.port,
            n.user,
            identity_file=str(nodes.client_key),
            proxy_command=f"{sys.executable} {relay} {n.host} %p",
            host_key_id="i-0123456789",
        ),
        "node0",
    )
    t.put(b"x", f"/tmp/mlcloud-close-{os.getpid()}")  # sftp open: a channel to say goodbye on
    proxy = t._transport.sock._sock.process  # (the ProxyCommand's process)
    nodes.kill(0)
    proxy.wait(timeout=20)  # the relay saw the node go and ended
    t.close()


def test_cluster_key_modes_tightened(mlcloud_home):
    path, public = keys.ensure_cluster_key("c-1")
    assert public.startswith("ssh-ed25519 ") and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    os.chmod(path, 0o644)
    os.chmod(path.parent, 0o755)
    again, public2 = keys.ensure_cluster_key("c-1")
    assert public2 == public
    assert stat.S_IMODE(again.stat().st_mode) == 0o600
    assert stat.S_IMODE(again.parent.stat().st_mode) == 0o700


def test_known_hosts_survive_a_write_that_fails_midway(make_ssh_nodes, monkeypatch):
    """Pins are written beside the file and renamed over it: a kill or a full disk mid-write
    leaves the old pins, never a truncated file."""
    import paramiko

    nodes = make_ssh_nodes(2)
    ts = transports(nodes)
    ts[0].run("true")
    pinned = keys.known_hosts_path().read_text()

    def half_then_fail(self, filename):
        with open(filename, "w") as f:
            f.write("[127.0.0.")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paramiko.HostKeys, "save", half_then_fail)
    with pytest.raises(
        MlcloudError, match=f"cannot save pinned host keys to {keys.known_hosts_path()}"
    ):
        ts[1].run("true")
    assert keys.known_hosts_path().read_text() == pinned
    assert stat.S_IMODE(keys.known_hosts_path().stat().st_mode) == 0o600
    assert [p.name for p in keys.known_hosts_path().parent.glob(".known_hosts*")] == []
    for t in ts:
        t.close()
