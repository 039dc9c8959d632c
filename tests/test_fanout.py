"""Ship once over the slow link: the client streams the workdir to one node, which passes it on
to the others over SSH with the cluster's peer key (mlcloud/remote/fanout.py,
templates/fanout.py). Real sshd nodes; the client's bytes are counted on its sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sync_stream import shared_content_tree

from mlcloud.provision import handle
from mlcloud.remote import sync
from mlcloud.remote.fanout import ZSTD_CHECK, Target, sync_nodes
from mlcloud.remote.ssh import SshTarget, SshTransport

MB = 1_000_000


def MARK_OF(root: str) -> str:  # noqa: N802
    return f"mlcloud-peer:{root}"


def state_path():
    from mlcloud.state import paths

    return paths.home() / "state.db"


@pytest.fixture
def sent(monkeypatch):
    """Bytes this process writes to its SSH sockets, counted as they go."""
    total = [0]
    real = socket.create_connection

    class Counting:
        def __init__(self, sock):
            self._sock = sock

        def send(self, data):
            n = self._sock.send(data)
            total[0] += n
            return n

        def sendall(self, data):
            total[0] += len(data)
            return self._sock.sendall(data)

        def __getattr__(self, name):
            return getattr(self._sock, name)

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Counting(real(*a, **k)))
    return total


def cluster(nodes, tmp_path, count=None, python=None):
    """A target per sshd node: one cluster directory on this machine, a node directory each;
    python: the interpreter of some nodes, by index (else python3, this venv's)."""
    python = python or {}
    return [
        Target(
            SshTransport(
                SshTarget(
                    n.host,
                    n.port,
                    n.user,
                    identity_file=str(nodes.client_key),
                    python=python.get(i, "python3"),
                ),
                f"node{i}",
            ),
            str(tmp_path / "cluster" / f"node-{i}"),
        )
        for i, n in enumerate(nodes.nodes[:count])
    ]


@pytest.fixture
def python_without_zstd(tmp_path):
    """A Python that decodes no zstd: a bare venv of this one's base interpreter."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    python = str(bare / "bin" / "python")
    check = subprocess.run([python, "-I", "-c", ZSTD_CHECK], capture_output=True)
    if check.returncode == 0:
        pytest.skip("this Python's base interpreter decodes zstd")
    return python


def workdir(root, files=8, size=MB // 2):
    root.mkdir()
    for i in range(files):
        (root / f"w{i}.bin").write_bytes(os.urandom(size))  # incompressible: bytes are bytes
    (root / "train.py").write_text("print('hi')\n")
    return root


def manifests(targets):
    return [
        {p: e.digest for p, e in sync.load((sync_dir(t) / sync.MANIFEST).read_bytes()).items()}
        for t in targets
    ]


def sync_dir(t):
    return Path(t.dest)


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def close(targets):
    for t in targets:
        t.transport.close()


def test_client_sends_the_workdir_once_and_every_node_ends_the_same(make_ssh_nodes, tmp_path, sent):
    nodes = make_ssh_nodes(4)
    src = workdir(tmp_path / "src")
    size = 8 * (MB // 2)
    targets = cluster(nodes, tmp_path)
    notes: list[str] = []
    try:
        stats = sync_nodes(targets, src, "fan-1", notes.append)
        assert notes == []
        assert [s.relayed for s in stats] == [False, True, True, True]
        # once, plus the probe, the programs installed on each node and SSH's own framing
        assert sent[0] < 1.1 * size + 150_000, sent[0]
        want = {p: e.digest for p, e in sync.scan(src).items()}
        assert manifests(targets) == [want] * 4
        assert all(
            (sync_dir(t) / "w3.bin").read_bytes() == (src / "w3.bin").read_bytes() for t in targets
        )

        # a re-sync sends what changed, once
        (src / "w0.bin").write_bytes(os.urandom(MB))
        (src / "w1.bin").unlink()
        sent[0] = 0
        stats = sync_nodes(targets, src, "fan-1", notes.append)
        assert [(s.files_sent, s.files_deleted, s.relayed) for s in stats] == [
            (1, 1, False),
            *[(1, 1, True)] * 3,
        ]
        assert MB < sent[0] < 1.1 * MB + 30_000, sent[0]
        want = {p: e.digest for p, e in sync.scan(src).items()}
        assert manifests(targets) == [want] * 4 and notes == []
    finally:
        close(targets)

    # the private key went to the relay only; the others let it run their receiver, no more
    peer_keys = [
        (tmp_path / "cluster" / f"node-{i}" / "peer/id_ed25519").exists() for i in range(4)
    ]
    assert peer_keys == [True, False, False, False]
    line = (nodes.node_dir(2) / "authorized_keys").read_text()
    assert line.startswith('restrict,command="exec ') and line.count("\n") == 1
    key = tmp_path / "cluster" / "node-0" / "peer/id_ed25519"
    options = nodes.ssh_options()
    options[options.index("-i") + 1] = str(key)  # the peer key alone
    argv = ["ssh", *options, f"{nodes.user}@{nodes.hosts[2]}"]
    for command in (f"touch {tmp_path}/pwned", "../../etc"):
        r = subprocess.run([*argv, command], capture_output=True, text=True, input="", timeout=30)
        assert r.returncode == 3 and "refused" in r.stderr, r
    assert not (tmp_path / "pwned").exists()


def test_a_peer_that_fails_mid_fanout_is_synced_from_the_client(make_ssh_nodes, tmp_path, sent):
    nodes = make_ssh_nodes(4)
    src = workdir(tmp_path / "src")
    targets = cluster(nodes, tmp_path)
    try:
        sync_nodes(targets, src, "fan-2")
        # node2: the relay cannot log in there any more (reachable from the client only);
        # node3: its receiver dies after the first 64 KiB of the stream
        (nodes.node_dir(2) / "authorized_keys").write_text("")
        keys = nodes.node_dir(3) / "authorized_keys"
        public = keys.read_text().split('" ', 1)[1]
        dies = "echo '{\\\"manifest\\\": {}}'; head -c 65536 >/dev/null; kill -9 $$"
        keys.write_text(f'restrict,command="{dies}" {public}')
        for i in range(4):
            (src / f"w{i}.bin").write_bytes(os.urandom(MB // 2))
        notes: list[str] = []
        sent[0] = 0
        stats = sync_nodes(targets, src, "fan-2", notes.append)
        assert [s.relayed for s in stats] == [False, True, False, False]
        assert [n.split(":")[0] for n in notes] == ["node2", "node3"], notes
        assert "sending it from here" in notes[0]
        assert 3 * 2 * MB < sent[0] < 3.3 * 2 * MB, sent[0]  # the relay, node2 and node3
        want = {p: e.digest for p, e in sync.scan(src).items()}
        assert manifests(targets) == [want] * 4
    finally:
        close(targets)


def test_falls_back_to_client_fanout_when_nodes_cannot_reach_each_other(
    make_ssh_nodes, tmp_path, sent
):
    nodes = make_ssh_nodes(3)
    src = workdir(tmp_path / "src")
    targets = cluster(nodes, tmp_path)
    want = lambda: {p: e.digest for p, e in sync.scan(src).items()}  # noqa: E731
    try:
        # the fan-out cannot be set up on any node (its authorized keys file is a directory)
        for i in range(3):
            nodes.node_dir(i).joinpath("authorized_keys").mkdir()
        notes: list[str] = []
        stats = sync_nodes(targets, src, "fan-3", notes.append)
        assert not any(s.relayed for s in stats)
        assert len(notes) == 3 and all("sending the workdir to it from here" in n for n in notes)
        assert 3 * 4 * MB < sent[0] < 3.3 * 4 * MB
        assert manifests(targets) == [want()] * 3

        # set up, then no peer lets the relay in any more: each is synced from the client
        for i in range(3):
            nodes.node_dir(i).joinpath("authorized_keys").rmdir()
        (src / "w0.bin").write_bytes(os.urandom(MB))
        assert [s.relayed for s in sync_nodes(targets, src, "fan-3")] == [False, True, True]
        for i in range(3):
            nodes.node_dir(i).joinpath("authorized_keys").write_text("")
        (src / "w0.bin").write_bytes(os.urandom(MB))
        notes.clear()
        sent[0] = 0
        stats = sync_nodes(targets, src, "fan-3", notes.append)
        assert not any(s.relayed for s in stats)
        assert [n.split(":")[0] for n in notes] == ["node1", "node2"], notes
        assert 3 * MB < sent[0] < 3.3 * MB
        assert manifests(targets) == [want()] * 3
    finally:
        close(targets)


def test_a_small_change_goes_straight_to_each_node(make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(2)
    src = workdir(tmp_path / "src", files=1, size=1000)
    targets = cluster(nodes, tmp_path)
    try:
        stats = sync_nodes(targets, src, "fan-4")
    finally:
        close(targets)
    assert not any(s.relayed for s in stats)
    assert not (tmp_path / "cluster" / "node-0" / "peer").exists()  # nothing installed
    assert json.loads((sync_dir(targets[1]) / sync.MANIFEST).read_text()).keys() == {
        "w0.bin",
        "train.py",
    }


def test_train_sync_relays_through_the_head_and_down_takes_the_key_back(make_ssh_nodes, tmp_path):
    """The engine's path (`launch.prepare_nodes`, as `train` runs it) on a cluster `up` made;
    `down` removes the peer key's line from every node."""
    from conftest import run_cli, ssh_up_args

    from mlcloud import state
    from mlcloud.jobs import launch
    from mlcloud.remote import keys
    from mlcloud.report import PlainReporter

    nodes = make_ssh_nodes(3)
    assert run_cli(*ssh_up_args(nodes, "fan")).returncode == 0
    src = workdir(tmp_path / "src", files=3)
    store = state.Store(state_path())
    h = handle.open_cluster(store, "fan")
    messages: list[str] = []

    class Report(PlainReporter):
        def info(self, message: str) -> None:
            messages.append(message)

    try:
        req = launch.JobRequest(src, "train.py", (), None, {}, None, None)
        launch.prepare_nodes(h, req, [0, 1, 2], Report(), print)
    finally:
        h.close()
    assert messages == [
        "synced: 12 file(s), 0 deleted, 1.5 MB sent from here (2 node(s) served by a peer)"
    ]
    roots = [n.root for n in h.nodes]
    want = {p: e.digest for p, e in sync.scan(src).items()}
    assert manifests([Target(t, r) for t, r in zip(h.transports, roots, strict=True)]) == [want] * 3
    assert all(
        MARK_OF(r) in (nodes.node_dir(i) / "authorized_keys").read_text()
        for i, r in enumerate(roots)
    )
    assert keys.peer_key_path(h.record.uid).exists()

    assert run_cli("down", "fan", "--yes").returncode == 0
    assert all((nodes.node_dir(i) / "authorized_keys").read_text() == "" for i in range(3))


def test_authorize_replaces_lines_of_node_directories_that_are_gone(tmp_path, monkeypatch):
    """sshd takes the first line with a key: a line left for a removed node directory would
    shadow the new node's, so installing drops such lines (and never another cluster's)."""
    import shutil

    from mlcloud import templates

    keys_file = tmp_path / "ssh" / "authorized_keys"
    keys_file.parent.mkdir()
    keys_file.write_text("ssh-ed25519 AAAAuser user@laptop\n")
    monkeypatch.setenv("MLCLOUD_AUTHORIZED_KEYS", str(keys_file))

    def authorize(root):
        (root / "peer").mkdir(parents=True)
        shutil.copy(templates.path("fanout.py"), tmp_path / "fanout.py")
        shutil.copy(templates.path("receive.py"), tmp_path / "receive.py")
        argv = [sys.executable, "-I", "-S", str(tmp_path / "fanout.py"), "authorize", str(root)]
        subprocess.run([*argv, "ssh-ed25519 AAAApeer", "s1"], check=True)

    old, new, other = (
        tmp_path / "a" / "node-0",
        tmp_path / "b" / "node-0",
        tmp_path / "c" / "node-0",
    )
    authorize(old)
    authorize(other)
    shutil.rmtree(old)
    authorize(new)
    lines = keys_file.read_text().splitlines()
    assert lines[0] == "ssh-ed25519 AAAAuser user@laptop"
    assert [x.rsplit(" ", 1)[1] for x in lines[1:]] == [MARK_OF(str(other)), MARK_OF(str(new))]
    assert 'command="exec ' in lines[2] and lines[2].startswith("restrict,")
    assert (new / "peer" / "stamp").read_text() == "s1"


def test_a_relay_without_an_ssh_client_leaves_the_client_to_send(make_ssh_nodes, tmp_path, sent):
    """Nodes whose PATH has everything but OpenSSH's client: no relay, each node from here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if name != "ssh" and not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(os.path.join(folder, name))
    python_dir = os.path.dirname(os.path.abspath(sys.executable))
    nodes = make_ssh_nodes(2, env_path=f"{python_dir}:{bin_dir}")
    src = workdir(tmp_path / "src", files=2)
    targets = cluster(nodes, tmp_path)
    notes: list[str] = []
    try:
        stats = sync_nodes(targets, src, "fan-5", notes.append)
    finally:
        close(targets)
    assert notes == [
        "node0 has no ssh client to pass the workdir on; sending it to each node from here"
    ]
    assert not any(s.relayed for s in stats) and 2 * MB < sent[0] < 2.2 * MB
    assert manifests(targets) == [{p: e.digest for p, e in sync.scan(src).items()}] * 2


def test_when_the_relay_cannot_take_the_workdir_the_sync_fails_and_nothing_is_left_running(
    make_ssh_nodes, tmp_path
):
    from mlcloud.remote.transport import RemoteError

    nodes = make_ssh_nodes(3)
    src = workdir(tmp_path / "src", files=4)
    targets = cluster(nodes, tmp_path)
    blocker = sync_dir(targets[0]) / "w3.bin" / "job-output"  # a directory where a file goes
    blocker.mkdir(parents=True)
    try:
        with pytest.raises(RemoteError, match=r"node0: syncing the workdir failed .*refused"):
            sync_nodes(targets, src, "fan-6")
    finally:
        close(targets)
    # the peers' receivers see their stream end, remove what they were writing, and exit
    deadline = time.monotonic() + 10
    while [p for i in range(3) for p in nodes.pids(i) if b"fanout.py" in cmdline(p)]:
        assert time.monotonic() < deadline, "a receiver or the relay is still running"
        time.sleep(0.05)
    want = {p: e.digest for p, e in sync.scan(src).items()}
    assert not (sync_dir(targets[0]) / sync.MANIFEST).exists()
    for i in (1, 2):  # a peer's copy is whole (it had the stream before the relay failed), or
        # it has none: nothing half-written either way
        assert list(sync_dir(targets[i]).rglob("*.mlcloud-tmp")) == []
        if (sync_dir(targets[i]) / sync.MANIFEST).exists():
            assert manifests([targets[i]]) == [want]


def test_nodes_on_this_machine_sync_as_before(tmp_path):
    """The local provider's nodes share the client's disk: each is synced in place, no relay."""
    from mlcloud.remote.local import LocalTransport

    src = workdir(tmp_path / "src", files=2, size=1000)
    targets = [Target(LocalTransport(f"node{i}"), str(tmp_path / f"node-{i}")) for i in range(3)]
    stats = sync_nodes(targets, src, "fan-7", relay_above=0)
    assert [(s.files_sent, s.relayed) for s in stats] == [(3, False)] * 3
    assert manifests(targets) == [{p: e.digest for p, e in sync.scan(src).items()}] * 3
    assert not any((tmp_path / f"node-{i}" / "bin").exists() for i in range(3))


def test_a_home_another_thread_made_meanwhile_is_taken(tmp_path, monkeypatch):
    """The fan-out's probes make the first connections of a fresh home side by side, and each
    asks for the home: one made by another thread between two looks is a directory, not "a
    file"."""
    from mlcloud.state import paths

    home = tmp_path / "fresh"

    class Racing(type(home)):
        looked = False

        def is_dir(self):
            if not Racing.looked:  # not there at the first look; another thread makes it
                Racing.looked = True
                os.mkdir(self)
                return False
            return super().is_dir()

    monkeypatch.setattr(paths, "home_path", lambda: Racing(home))
    assert paths.home() == home


def test_the_stream_is_zstd_where_every_node_it_reaches_decodes_it(
    make_ssh_nodes, tmp_path, sent, python_without_zstd
):
    """The probe asks each node's Python; the relay passes on the stream as it came, so it is
    zstd only when the relay and its peers all decode it, and a node synced from here gets the
    codec its own Python decodes."""
    nodes = make_ssh_nodes(3)
    src = tmp_path / "src"
    size = shared_content_tree(src)  # what files share travels once in zstd, not in zlib
    want = lambda: {p: e.digest for p, e in sync.scan(src).items()}  # noqa: E731
    targets = cluster(nodes, tmp_path / "a")
    try:
        stats = sync_nodes(targets, src, "z-1")
        assert [s.relayed for s in stats] == [False, True, True]
        assert sent[0] < 0.3 * size, sent[0]
        assert manifests(targets) == [want()] * 3
    finally:
        close(targets)

    targets = cluster(nodes, tmp_path / "b", python={2: python_without_zstd})
    notes: list[str] = []
    try:
        sent[0] = 0
        stats = sync_nodes(targets, src, "z-2", notes.append)
        assert [s.relayed for s in stats] == [False, True, True] and notes == []
        assert sent[0] > size, sent[0]  # zlib, one file at a time
        assert manifests(targets) == [want()] * 3
        (src / "run.sh").write_text("#!/bin/sh\necho changed\n")  # straight to each node
        stats = sync_nodes(targets, src, "z-2", notes.append)
        assert [(s.files_sent, s.relayed) for s in stats] == [(1, False)] * 3 and notes == []
        assert manifests(targets) == [want()] * 3
    finally:
        close(targets)


def test_a_single_node_gets_the_codec_its_python_decodes(
    make_ssh_nodes, tmp_path, sent, python_without_zstd
):
    nodes = make_ssh_nodes(1)
    src = tmp_path / "src"
    size = shared_content_tree(src)
    want = {p: e.digest for p, e in sync.scan(src).items()}
    for where, python, small in (("a", "python3", True), ("b", python_without_zstd, False)):
        targets = cluster(nodes, tmp_path / where, python={0: python})
        sent[0] = 0
        try:
            (stats,) = sync_nodes(targets, src, "z-3")
        finally:
            close(targets)
        assert stats.files_sent == 31 and manifests(targets) == [want]
        assert (sent[0] < 0.3 * size) if small else (sent[0] > size), (python, sent[0])


def test_the_relay_takes_its_copy_while_a_peer_is_slow_to_answer(make_ssh_nodes, tmp_path):
    """The client's stream is queued for a peer whose session is still opening: the relay's
    own copy does not wait for it, and the peer still gets the stream whole."""
    nodes = make_ssh_nodes(3)
    src = workdir(tmp_path / "src", files=2)
    targets = cluster(nodes, tmp_path)
    try:
        sync_nodes(targets, src, "fan-8")
        keys = nodes.node_dir(2) / "authorized_keys"
        keys.write_text(keys.read_text().replace('command="exec ', 'command="sleep 4; exec ', 1))
        for i in range(2):
            (src / f"w{i}.bin").write_bytes(os.urandom(MB // 2))
        start = time.time()
        stats = sync_nodes(targets, src, "fan-8")
        assert [s.relayed for s in stats] == [False, True, True]
        relay_done = (sync_dir(targets[0]) / sync.MANIFEST).stat().st_mtime
        slow_done = (sync_dir(targets[2]) / sync.MANIFEST).stat().st_mtime
        assert slow_done >= start + 4 and relay_done < start + 3, (start, relay_done, slow_done)
        assert manifests(targets) == [{p: e.digest for p, e in sync.scan(src).items()}] * 3
    finally:
        close(targets)
