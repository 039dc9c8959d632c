"""The local transport: streamed output with a chatty stderr, timeouts, the node's own env."""

from __future__ import annotations

import pytest

from mlcloud.remote.local import LocalTransport
from mlcloud.remote.transport import RemoteError


def test_a_flood_on_stderr_does_not_block_streamed_stdout():
    lines: list[str] = []
    r = LocalTransport("node0").run(
        "head -c 300000 /dev/zero >&2; echo done", on_line=lines.append, timeout=30
    )
    assert r.exit_code == 0 and lines == ["done"] and len(r.stderr) == 300000


@pytest.mark.parametrize("stream", [True, False])
def test_timeout_names_the_node(stream):
    kw = {"on_line": lambda line: None} if stream else {}
    with pytest.raises(RemoteError, match="node3: command timed out"):
        LocalTransport("node3").run("sleep 10", timeout=0.3, **kw)


def test_node_env_wins_and_the_users_ssh_session_stays_out(monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "10.0.0.1 5 10.0.0.2 22")
    t = LocalTransport("node1", env={"CUDA_VISIBLE_DEVICES": "2,3"})
    out = t.run('echo "${SSH_CONNECTION:-none} $CUDA_VISIBLE_DEVICES"').stdout.split()
    assert out == ["none", "2,3"]
