"""The workdir fan-out between hosts of their own (network namespaces on a bridge, tests/
nsbridge.py) whose sshd reads its keys from a file named in its config (`sshd -f`), not from
~/.ssh: the peer key's line goes where that daemon looks, so the client still sends the
workdir once."""

from __future__ import annotations

import os

import nsbridge
import pytest
from test_fanout import sent  # noqa: F401 (a fixture)

from mlcloud.remote.fanout import Target, sync_nodes
from mlcloud.remote.ssh import SshTarget, SshTransport

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not nsbridge.available(), reason="needs root, iproute2 and sshd"),
]


def test_the_peer_key_goes_where_the_nodes_sshd_reads_keys(tmp_path, monkeypatch, sent):  # noqa: F811
    monkeypatch.delenv("MLCLOUD_AUTHORIZED_KEYS", raising=False)
    size = 1_500_000
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(size))
    with nsbridge.NsBridge(3, tmp_path / "ns") as b:
        monkeypatch.setenv("MLCLOUD_NETGUARD_ALLOW", b.subnet)
        targets = [
            Target(
                SshTransport(SshTarget(h, 22, "root", identity_file=str(b.client_key)), f"node{i}"),
                str(tmp_path / "cluster" / f"node-{i}"),
            )
            for i, h in enumerate(b.hosts)
        ]
        notes: list[str] = []
        try:
            stats = sync_nodes(targets, src, "ns-1", notes.append)
        finally:
            for t in targets:
                t.transport.close()
        assert notes == [] and [s.relayed for s in stats] == [False, True, True]
        assert sent[0] < 1.1 * size + 150_000, sent[0]
        assert "mlcloud-peer:" in (b.workdir / "authorized_keys").read_text()
