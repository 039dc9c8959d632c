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


@pytest.mark.parametrize("stream", [True, False])
def test_a_timeout_ends_everything_the_command_started(stream, tmp_path):
    """Not only bash: a child holding the output would otherwise outlive the timeout."""
    import os
    import time

    pidfile = tmp_path / "pid"
    kw = {"on_line": lambda line: None} if stream else {}
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="timed out"):
        LocalTransport("node0").run(f"sleep 60 & echo $! > {pidfile}; wait", timeout=0.5, **kw)
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the command's child survived its timeout")
