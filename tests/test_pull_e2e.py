"""Results come home over real OpenSSH nodes: `train --pull`, `pull` (intact by sha256, a
second pull sends only what changed), `train --pull --down`, the
hostile-node battery (a malicious sender on a real sshd node, so the client's checks are what
is tested), and `down` asking about outputs nobody pulled."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from conftest import run_cli, ssh_up_args
from mlcloud.templates.receive import is_tmp

from mlcloud.errors import UsageError
from mlcloud.remote import fetch, ssh
from mlcloud.remote.ssh import SshTarget, SshTransport
from mlcloud.remote.transport import RemoteError

pytestmark = pytest.mark.e2e

WRITER = """\
import os, pathlib
out = pathlib.Path(os.environ["MLCLOUD_OUTPUT_DIR"])
(out / "sub").mkdir(parents=True, exist_ok=True)
(out / "weights.bin").write_bytes(os.urandom(1_500_000))
(out / "sub" / "metrics.json").write_text('{"node": %s}' % os.environ["MLCLOUD_NODE_RANK"])
"""


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != fetch.MANIFEST
    }


def pull_json(*args: str) -> dict:
    r = run_cli("pull", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_train_pull_pull_again_and_train_pull_down(make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(2)
    assert run_cli(*ssh_up_args(nodes, "lab")).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    (work / "write.py").write_text(WRITER)
    dest = tmp_path / "results"
    r = run_cli("train", "lab", "-w", str(work), f"--pull={dest}", "write.py")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    uid = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["uid"]
    root = Path.home() / ".mlcloud" / uid
    outputs = [root / f"node-{i}" / "jobs" / "1" / "outputs" for i in (0, 1)]
    for i, out in enumerate(outputs):
        assert tree(dest / f"node{i}") == tree(out) and len(tree(out)) == 2

    again = pull_json("lab", str(dest))
    assert again["files"] == 0 and all(n["bytes"] < 2000 for n in again["nodes"])

    (outputs[1] / "weights.bin").write_bytes(os.urandom(1_000_000))
    third = pull_json("lab", str(dest), "--job", "1")
    assert [n["files"] for n in third["nodes"]] == [0, 1]
    assert 1_000_000 < third["nodes"][1]["bytes"] < 1_005_000
    assert tree(dest / "node1") == tree(outputs[1])

    # --pull with no DEST, then --down: the outputs are home before the nodes go
    r = run_cli("train", "lab", "-w", str(work), "write.py", "--pull", "--down", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
    for i in (0, 1):
        got = tmp_path / "mlcloud-results" / "lab" / "job-2" / f"node{i}"
        assert json.loads((got / "sub" / "metrics.json").read_text()) == {"node": i}
        assert (got / "weights.bin").stat().st_size == 1_500_000


def test_a_node_that_is_down_fails_the_pull_in_one_line_and_the_others_come_home(
    make_ssh_nodes, tmp_path
):
    from mlcloud import state
    from mlcloud.state import paths

    nodes = make_ssh_nodes(2)
    assert run_cli(*ssh_up_args(nodes, "lab")).returncode == 0
    store = state.open_store()
    rec = store.get_cluster("lab")
    store.new_job("lab", rec.uid, "train.py", 2, 1, paths.logs_dir("lab"))
    store.close()
    for n in rec.nodes:
        out = Path(n.root) / "jobs" / "1" / "outputs"
        out.mkdir(parents=True)
        (out / "model.pt").write_text(f"node{n.idx}")
    nodes.kill(1)
    r = run_cli("pull", "lab", str(tmp_path / "res"))
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error: node1 (")
    assert "unreachable" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith(f"; node0 pulled into {tmp_path / 'res'}")
    assert (tmp_path / "res" / "node0" / "model.pt").read_text() == "node0"

    r = run_cli("down", "lab", "--yes", "--json")  # stdout is one JSON document all the same
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error: node1 (")
    (gone,) = json.loads(r.stdout)["clusters"]
    assert (gone["status"], gone["unpulled_job"]) == ("failed", 1)
    nodes.restart(1)
    assert run_cli("down", "lab", "--yes").returncode == 0


HOSTILE = r"""
import json, os, sys
req = json.loads(sys.stdin.buffer.read())
scenario = json.load(open(sys.argv[1]))
out = sys.stdout.buffer
if req["mode"] == "list":
    out.write(json.dumps(scenario["listing"]).encode() + b"\n")
    sys.exit()
open(sys.argv[1] + ".pid", "w").write(str(os.getpid()))
for meta, body in scenario["frames"]:
    out.write(json.dumps(meta).encode() + b"\n")
    if body == "FLOOD":  # as much as the client will take: it should take none
        while True:
            out.write(b"\0" * (1 << 20))
    out.write(body.encode())
out.flush()
"""


@pytest.fixture
def node(make_ssh_nodes, tmp_path):
    """A transport to a real sshd node."""
    nodes = make_ssh_nodes(1)
    n = nodes.nodes[0]
    target = SshTarget(
        n.host, n.port, n.user, identity_file=str(nodes.client_key), python=nodes.python
    )
    t = SshTransport(target, "node0")
    yield t
    t.close()


def serve(monkeypatch, tmp_path, t, files, frames=()):
    """Replace the node's sender by one that says what the test wants."""
    script, scenario = tmp_path / "hostile.py", tmp_path / "scenario.json"
    script.write_text(HOSTILE)
    scenario.write_text(json.dumps({"listing": {"files": files}, "frames": list(frames)}))
    monkeypatch.setattr(fetch, "_command", lambda _: f"{t.python} -I {script} {scenario}")
    return scenario


def test_hostile_node_battery(node, monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    bashrc = home / ".bashrc"
    bashrc.write_text("# mine\n")
    dest = home / "results" / "job-1" / "node0"

    # ../../.bashrc, an absolute path: nothing of the node is written
    for evil in ("../../.bashrc", str(bashrc)):
        serve(monkeypatch, tmp_path, node, [[evil, 6, 0, "", 0o644], ["ok", 2, 0, "", 0o644]])
        with pytest.raises(fetch.Refused, match="unsafe path"):
            fetch.fetch(node, {"output": "/x"}, dest, 1 << 30)
        assert bashrc.read_text() == "# mine\n" and not (dest / "ok").exists()

    # a symlink to /etc: the stream cannot express one, and one planted here is not followed
    serve(
        monkeypatch,
        tmp_path,
        node,
        [["etc", 0, 0, "", 0o120777]],
        [({"p": "etc", "n": 0, "m": 0o777, "link": "/etc"}, "")],
    )
    with pytest.raises(fetch.Refused, match="bad size or mode"):
        fetch.fetch(node, {"output": "/x"}, dest, 1 << 30)
    (dest / "etc").symlink_to(tmp_path / "victim")
    (tmp_path / "victim").mkdir()
    frame = {"p": "etc/passwd", "n": 4, "m": 0o644}
    serve(monkeypatch, tmp_path, node, [["etc/passwd", 4, 0, "", 0o644]], [(frame, "evil")])
    with pytest.raises(fetch.Refused, match="symlink"):
        fetch.fetch(node, {"output": "/x"}, dest, 1 << 30)
    assert list((tmp_path / "victim").iterdir()) == []

    # 100 GB listed: refused from the listing, before a byte of it travels
    big = [["big", 100 * 10**9, 0, "", 0o644]]
    serve(monkeypatch, tmp_path, node, big, [({"p": "big", "n": 100 * 10**9, "m": 0o644}, "FLOOD")])
    with pytest.raises(UsageError, match=r"93.1 GiB to pull is over the limit of 1.0 GiB"):
        fetch.fetch(node, {"output": "/x"}, dest, 1 << 30)

    # listed small, streamed at 100 GB: refused at its frame, and the sender stopped
    started = time.monotonic()
    scenario = serve(
        monkeypatch,
        tmp_path,
        node,
        [["big", 10, 0, "", 0o644]],
        [({"p": "big", "n": 100 * 10**9, "m": 0o644}, "FLOOD")],
    )
    with pytest.raises(fetch.Refused, match="listed at 10 bytes and sent at 100,000,000,000"):
        fetch.fetch(node, {"output": "/x"}, dest, 1 << 30)
    assert time.monotonic() - started < 10 and not (dest / "big").exists()
    pid = int(Path(f"{scenario}.pid").read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the node's sender kept running"
    assert sorted(p.name for p in dest.iterdir()) == [fetch.MANIFEST, "etc"]

    # a node that answers and then sends nothing does not hold the pull forever
    monkeypatch.setattr(ssh, "STREAM_IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(fetch, "_command", lambda _: "sleep 3")
    with pytest.raises(RemoteError, match="node0 .*: sent nothing for 0 s"):
        fetch.fetch(node, {"output": "/x"}, dest, 1 << 30)


def test_an_honest_node_with_traps_sends_only_its_regular_files(node, tmp_path):
    """The real sender on a real node: a symlink to /etc stays there, a 100 GB sparse file
    is refused from the listing in well under a second's transfer."""
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "etc").symlink_to("/etc")
    (out / "model.pt").write_bytes(b"weights")
    dest = tmp_path / "dest"
    got = fetch.fetch(node, {"output": str(out)}, dest, 1 << 30)
    assert (got.files, got.skipped) == (1, ("etc",))
    assert sorted(p.name for p in dest.iterdir()) == [fetch.MANIFEST, "model.pt"]
    with open(out / "sparse.bin", "wb") as f:
        try:
            f.truncate(100 * 10**9)
        except OSError:
            pytest.skip("this file system cannot hold a 100 GB sparse file")
    with pytest.raises(UsageError, match=r"over the limit .*sparse.bin alone is 93.1 GiB"):
        fetch.fetch(node, {"output": str(out)}, dest, 1 << 30)
    assert not (dest / "sparse.bin").exists()


@pytest.fixture
def local():
    """Clusters on the local provider, all torn down after the test (their node agents too)."""
    yield
    run_cli("down", "--all", "--yes")


def test_down_says_when_the_newest_jobs_outputs_were_never_pulled(local, tmp_path):
    from mlcloud import state
    from mlcloud.state import paths

    assert run_cli("up", "loc", "--provider", "local", "--nodes", "2", "--yes").returncode == 0
    store = state.open_store()
    uid = store.get_cluster("loc").uid
    job = store.new_job("loc", uid, "train.py", 2, 1, paths.logs_dir("loc"))
    store.update_job("loc", uid, job.job_id, status=state.JOB_SUCCEEDED, ended=time.time())

    r = run_cli("down", "loc")  # no terminal, no --yes: refused, not hung
    assert r.returncode == 2
    assert "the outputs of job 1 of loc were never pulled" in r.stderr and "--yes" in r.stderr
    pulled = pull_json("loc", str(tmp_path / "res"), "--node", "0")
    assert pulled["nodes"][0]["files"] == 0  # nothing there, and now pulled: only node1 left
    assert "job 1 of loc" in run_cli("down", "loc").stderr
    assert pull_json("loc", str(tmp_path / "res"))["files"] == 0
    r = run_cli("down", "loc")
    assert r.returncode == 2 and "never pulled" not in r.stderr

    job = store.new_job("loc", uid, "train.py", 2, 1, paths.logs_dir("loc"))
    r = run_cli("down", "loc", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["clusters"][0]["unpulled_job"] == 2
    store.close()


def test_pull_refuses_clearly(local):
    assert run_cli("up", "empty", "--provider", "local", "--yes").returncode == 0
    r = run_cli("pull", "empty")
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: no jobs on cluster 'empty' yet: nothing to pull"
    )
    r = run_cli("pull", "empty", "--max-size", "lots")
    assert r.returncode == 2 and "--max-size: 'lots' is not a size" in r.stderr
    r = run_cli("pull", "empty", "--node", "3", "--job", "1")
    assert r.returncode == 1 and "no job 1 on cluster 'empty'" in r.stderr
    assert run_cli("pull", "nope").returncode == 1


def test_ctrl_c_during_a_pull_leaves_no_temporaries_in_dest(local, tmp_path):
    """The interrupt reaches the main thread while the nodes' writers are mid-file: each
    removes its temporary before the pull gives up (workers are daemon threads)."""
    import signal
    import threading

    from mlcloud import state
    from mlcloud.jobs import pull
    from mlcloud.report import PlainReporter
    from mlcloud.state import paths

    assert run_cli("up", "int", "--provider", "local", "--nodes", "2", "--yes").returncode == 0
    store = state.open_store()
    rec = store.get_cluster("int")
    store.new_job("int", rec.uid, "train.py", 2, 1, paths.logs_dir("int"))
    sent = {}
    for n in rec.nodes:
        out = Path(n.root) / "jobs" / "1" / "outputs"
        out.mkdir(parents=True)
        sent[n.root] = os.urandom(20_000_000)
        (out / "weights.bin").write_bytes(sent[n.root])

    once = threading.Lock()

    class Interrupt:
        def start(self, total):
            pass

        def advance(self, n):
            if once.acquire(blocking=False):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as the terminal sends it

    dest = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        pull.pull(store, "int", dest, report=PlainReporter(), progress=lambda _: Interrupt())
    store.close()
    # A file a writer finished before the interrupt reached it stays, whole; nothing else does
    for p in dest.rglob("*"):
        assert not is_tmp(p.name), p
        if p.is_file() and p.name != fetch.MANIFEST:
            assert p.read_bytes() in sent.values(), p


def test_train_pull_that_fails_keeps_the_cluster_despite_down(local, tmp_path):
    """Outputs that did not come home are not deleted: --down waits for a pull that works."""
    assert run_cli("up", "keep", "--provider", "local", "--yes").returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    (work / "write.py").write_text(WRITER)
    (tmp_path / "blocker").write_text("a file where DEST's parent should be")
    r = run_cli(
        "train", "keep", "-w", str(work), f"--pull={tmp_path}/blocker/res", "write.py", "--down"
    )
    assert r.returncode == 1, r.stderr
    assert "pulling job 1's outputs failed" in r.stderr and "the cluster is kept" in r.stderr
    assert [c["name"] for c in json.loads(run_cli("status", "--json").stdout)["clusters"]] == [
        "keep"
    ]
    assert pull_json("keep", str(tmp_path / "res"))["nodes"][0]["files"] == 2


def test_progress_bars_on_a_terminal_only(local, tmp_path):
    import pty
    import subprocess

    from conftest import MLCLOUD

    from mlcloud import state
    from mlcloud.state import paths

    assert run_cli("up", "bars", "--provider", "local", "--yes").returncode == 0
    store = state.open_store()
    rec = store.get_cluster("bars")
    store.new_job("bars", rec.uid, "train.py", 1, 1, paths.logs_dir("bars"))
    out = Path(rec.nodes[0].root) / "jobs" / "1" / "outputs"
    out.mkdir(parents=True)
    (out / "weights.bin").write_bytes(os.urandom(3_000_000))
    store.close()

    main, sub = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    proc = subprocess.Popen(
        [MLCLOUD, "pull", "bars", str(tmp_path / "tty")],
        stderr=sub,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    os.close(sub)
    shown = b""
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the terminal's other end closed: the command is done
            break
        if not data:
            break
        shown += data
    assert proc.wait(timeout=60) == 0
    os.close(main)
    assert "node0" in shown.decode(errors="replace") and "3.0 MB" in shown.decode(errors="replace")
    plain = run_cli("pull", "bars", str(tmp_path / "plain"), "--checkpoints")
    assert plain.returncode == 0 and "3.0 MB" not in plain.stderr and "━" not in plain.stderr
    assert "node0: 1 file(s), 2.9 MiB received" in plain.stderr
    assert "node0: no checkpoint found" in plain.stderr  # asked for, and none there
