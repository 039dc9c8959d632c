"""A shared store on a real PostgreSQL: many homes, one truth. Concurrent `up`s, cluster locks
held by other homes (and by a killed process), and a database that goes away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import MLCLOUD, run_cli, tagged_pids

from mlcloud import state
from mlcloud.errors import BusyError

pytestmark = pytest.mark.e2e


def _home(tmp_path, name: str) -> dict:
    return dict(os.environ, MLCLOUD_HOME=str(tmp_path / name))


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`mlcloud` as another home (its own MLCLOUD_HOME, the same store)."""
    return subprocess.run(
        [MLCLOUD, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_six_ups_from_three_homes_make_one_cluster(pg_url, tmp_path):
    homes = [_home(tmp_path, f"home{i}") for i in range(3)]
    procs = [
        subprocess.Popen(
            [MLCLOUD, "up", "race", "--nodes", "1", "--yes"],
            env=homes[i % 3],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    assert sum("already up" in err for _, err in outs) == 5, outs
    listed = json.loads(_run(homes[2], "status", "--json").stdout)["clusters"]
    assert [(c["name"], c["num_nodes"]) for c in listed] == [("race", 1)]
    made = [h for h in homes if os.path.isdir(os.path.join(h["MLCLOUD_HOME"], "local"))]
    assert len(made) == 1  # one home made the nodes; the others found the cluster up
    assert _run(made[0], "down", "race", "--yes").returncode == 0


_HOLD = """
import sys
from mlcloud import state
with state.cluster_lock("held"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_lock_holder_is_named_and_its_kill_frees_the_lock(pg_url):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        heard: list[str] = []
        with pytest.raises(BusyError) as e:
            with state.cluster_lock("held", timeout=0.3, on_wait=heard.append):
                pass
        who = f"{state.whoami()} (pid {holder.pid}) since "
        assert who in str(e.value) and len(heard) == 1 and who in heard[0], (e.value, heard)
        with state.cluster_lock("other", timeout=1):  # another cluster is not held
            pass
        holder.kill()  # kill -9: the server ends its session, and the lock with it
        holder.wait(10)
        started = time.monotonic()
        with state.cluster_lock("held", timeout=10):
            assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait(10)


def test_a_gone_database_is_one_line_within_the_connect_timeout(pg_server, pg_url, monkeypatch):
    monkeypatch.setenv("MLCLOUD_DB_CONNECT_TIMEOUT", "2")
    assert run_cli("status").returncode == 0
    pg_server.stop()
    try:
        started = time.monotonic()
        r = run_cli("status", "--json")
        took = time.monotonic() - started
        assert r.returncode == 1, r.stderr
        assert json.loads(r.stdout)["error"]["kind"] == "environment"
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot be reached" in lines[0], r.stderr
        assert "Traceback" not in r.stderr and took < 10
    finally:
        pg_server.start()


def test_up_resumes_once_the_database_is_back(pg_server, pg_url, mlcloud_home, monkeypatch):
    """The server stops while `up` provisions: one line, exit 1; the next `up` resumes the
    intent row and finishes, and `down` leaves nothing running."""
    import psycopg

    monkeypatch.setenv("MLCLOUD_DB_CONNECT_TIMEOUT", "2")
    state.open_store().close()  # the schema, so the poll below can look for the row
    up = subprocess.Popen(
        [MLCLOUD, "up", "cut", "--nodes", "2", "--yes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    uid = None
    while uid is None and time.monotonic() < deadline:  # the intent row: provisioning began
        with psycopg.connect(pg_url) as c:
            row = c.execute("SELECT uid FROM clusters WHERE name='cut'").fetchone()
        uid = row[0] if row else None
        time.sleep(0.01)
    assert uid, "up never recorded its intent"
    pg_server.stop()
    try:
        out, err = up.communicate(timeout=60)
    finally:
        pg_server.start()
    assert up.returncode == 1, err  # bootstrapping 2 nodes takes ~1 s: the stop comes first
    last = err.strip().splitlines()[-1]
    assert "cannot be reached" in last or "terminating connection" in last, err
    assert "Traceback" not in err
    r = run_cli("up", "cut", "--nodes", "2", "--yes")
    assert r.returncode == 0, r.stderr
    listed = json.loads(run_cli("status", "--json").stdout)["clusters"]
    assert [(c["name"], c["status"], c["num_nodes"]) for c in listed] == [("cut", "UP", 2)]
    assert run_cli("down", "cut", "--yes").returncode == 0
    assert tagged_pids(f"{uid}.") == []


def test_a_state_url_in_config_yaml_and_a_bad_one(pg_url, mlcloud_home, monkeypatch):
    monkeypatch.delenv("MLCLOUD_STATE_URL")
    mlcloud_home.mkdir(parents=True, exist_ok=True)
    (mlcloud_home / "config.yaml").write_text(f"state_url: {pg_url}\n")
    r = run_cli("doctor", "--json")
    checks = {c["area"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["database"]["subject"].startswith("postgresql ")
    assert f"schema {state.SCHEMA_VERSION}" in checks["database"]["detail"]
    r = run_cli("doctor", "--rebuild", "--yes")  # a home's own state.db only
    assert r.returncode == 2 and "MLCLOUD_STATE_URL" in r.stderr.strip().splitlines()[-1]
    monkeypatch.setenv("MLCLOUD_STATE_URL", "mysql://x")
    r = run_cli("status")
    assert r.returncode == 2 and "postgresql://" in r.stderr.strip().splitlines()[-1]


def test_cluster_keys_are_sealed_and_a_dump_holds_neither_key_nor_secret(
    pg_server, pg_url, tmp_path, monkeypatch
):
    import paramiko
    from mlcloud.providers.base import AuthError

    from mlcloud.remote import keys

    secret = "team-secret-0f9a7c"
    monkeypatch.setenv("MLCLOUD_STATE_KEY", secret)
    path, public = keys.ensure_cluster_key("c-1")
    peer, _ = keys.ensure_peer_key("c-1")
    made = path.read_bytes()
    dump = pg_server.dump(pg_url)
    assert "keys/c-1.ed25519" in dump  # the sealed row is there...
    body = b"".join(made.splitlines()[1:-1]).decode()
    for clear in (body[:40], secret, "OPENSSH PRIVATE KEY", peer.splitlines()[1].decode()):
        assert clear not in dump  # ...and neither the key nor the secret
    host = paramiko.Ed25519Key.from_private_key_file(str(path))
    assert keys.check_or_pin("i-1", host, "node0")

    monkeypatch.setenv("MLCLOUD_HOME", str(tmp_path / "other"))  # a second home, same secret
    assert keys.cluster_key_path("c-1").read_bytes() == made
    assert keys.ensure_cluster_key("c-1")[1] == public
    assert not keys.check_or_pin("i-1", host, "node0")  # the pin made in the first home
    assert keys.ensure_peer_key("c-1")[0] == peer
    other = paramiko.Ed25519Key.from_private_key_file(str(keys.peer_key_path("c-1")))
    with pytest.raises(keys.HostKeyChanged):
        keys.check_or_pin("i-1", other, "node0")

    monkeypatch.setenv("MLCLOUD_HOME", str(tmp_path / "third"))
    monkeypatch.delenv("MLCLOUD_STATE_KEY")
    with pytest.raises(AuthError, match="MLCLOUD_STATE_KEY") as e:
        keys.cluster_key_path("c-1")
    assert e.value.exit_code == 5
    monkeypatch.setenv("MLCLOUD_STATE_KEY", "not-the-secret")
    with pytest.raises(AuthError, match="does not open"):
        keys.cluster_key_path("c-1")
    keys.delete_cluster_key("c-1")
    monkeypatch.setenv("MLCLOUD_STATE_KEY", secret)
    assert not keys.cluster_key_path("c-1").exists()  # gone from the store too


def test_two_homes_share_an_ssh_cluster(pg_url, make_ssh_nodes, tmp_path):
    """A makes it with a key file that is then deleted; B, with the team's secret alone,
    trains on it; A sees B's job and downs the cluster; B no longer lists it."""
    import shutil

    from conftest import ssh_up_args

    nodes = make_ssh_nodes(2)
    secret = {"MLCLOUD_STATE_KEY": "team-secret-1"}
    a = {**_home(tmp_path, "a"), **secret}
    b = {**_home(tmp_path, "b"), **secret}
    key = tmp_path / "a-key"
    shutil.copy(nodes.client_key, key)
    args = ssh_up_args(nodes, "lab")
    args[args.index(str(nodes.client_key))] = str(key)
    r = _run(a, *args)
    assert r.returncode == 0, r.stderr
    key.unlink()
    project = tmp_path / "proj"
    project.mkdir()
    (project / "hello.py").write_text("print('hello from', __import__('os').environ['RANK'])\n")
    r = _run(b, "train", "lab", "-w", str(project), "--nproc-per-node", "1", "hello.py")
    assert r.returncode == 0, r.stderr
    assert "hello from" in r.stdout
    (seen,) = json.loads(_run(a, "status", "lab", "--json").stdout)["clusters"]
    assert [j["status"] for j in seen["jobs"]] == ["SUCCEEDED"], seen
    assert seen["made_by"] == state.whoami()
    no_secret = {k: v for k, v in b.items() if k != "MLCLOUD_STATE_KEY"}
    no_secret["MLCLOUD_HOME"] = str(tmp_path / "c")
    r = _run(no_secret, "train", "lab", "-w", str(project), "hello.py")
    assert r.returncode == 5 and "MLCLOUD_STATE_KEY" in r.stderr.strip().splitlines()[-1]
    assert _run(a, "down", "lab", "--yes").returncode == 0
    assert json.loads(_run(b, "status", "--json").stdout)["clusters"] == []
    keys_files = [nodes.workdir / "authorized_keys"]  # what sshd reads first, then per node
    keys_files += [nodes.node_dir(i) / "authorized_keys" for i in range(2)]
    for f in keys_files:  # the cluster's key was taken back from every host
        assert "mlcloud-peer:" not in (f.read_text() if f.exists() else ""), f


def test_state_import_copies_a_home_once(pg_url, mlcloud_home, monkeypatch):
    from mlcloud.remote import keys
    from mlcloud.state import files

    monkeypatch.delenv("MLCLOUD_STATE_URL")  # the home's own SQLite first
    r = run_cli("state", "import")
    assert r.returncode == 2 and "MLCLOUD_STATE_URL" in r.stderr.strip().splitlines()[-1]
    home = state.open_store()
    home.create_cluster("lab", "lab-1", "ssh", {"nodes": 1}, "home-id")
    home.set_nodes(
        "lab", [state.NodeRecord(0, "h", "1.2.3.4", "1.2.3.4", "/r", 0, None, "running")]
    )
    home.set_status("lab", state.UP)
    job = home.new_job("lab", "lab-1", "train.py", 1, 1, mlcloud_home)
    home.update_job("lab", "lab-1", job.job_id, status=state.JOB_SUCCEEDED, exit_code=0)
    home.create_cluster("gone", "gone-1", "local", {}, "home-id")
    home.new_job("gone", "gone-1", "x.py", 1, 1, mlcloud_home)
    home.delete_cluster("gone")
    home.create_cluster("taken", "taken-1", "local", {}, "home-id")
    home.close()
    (mlcloud_home / "ssh").mkdir()
    (mlcloud_home / "ssh" / "lab-1.json").write_text('{"hosts": ["h"], "claimed": [0]}')
    made, _ = keys.ensure_cluster_key("lab-1")

    monkeypatch.setenv("MLCLOUD_STATE_URL", pg_url)
    monkeypatch.setenv("MLCLOUD_STATE_KEY", "s")
    shared = state.open_store()
    shared.create_cluster("taken", "taken-2", "local", {}, "someone")
    r = run_cli("state", "import", "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert (done["clusters"], done["history"]) == (["lab"], 1), done
    assert done["conflicts"] == ["taken (the store has taken-2)"]
    again = json.loads(run_cli("state", "import", "--json").stdout)
    assert again["clusters"] == [] and again["history"] == 0
    assert sorted(again["skipped"]) == ["gone-1", "lab"]
    rec = shared.get_cluster("lab")
    assert rec.status == state.UP and rec.nodes[0].ip == "1.2.3.4" and rec.made_by
    assert [j.status for j in shared.jobs("lab")] == [state.JOB_SUCCEEDED]
    assert [j.command for j in shared.jobs("gone")] == ["x.py"]
    assert json.loads(files.read("ssh/lab-1.json"))["claimed"] == [0]
    blob = files.read("keys/lab-1.ed25519")
    assert blob and made.read_bytes() not in blob


def test_a_server_that_stops_answering_mid_command_is_one_error(pg_url, monkeypatch):
    """The backend serving a command freezes between two of its statements (SIGSTOP: the
    server cannot time the statement out, the kernel still answers TCP): the command fails
    within MLCLOUD_DB_BUSY_TIMEOUT and a few seconds, as the database gone."""
    from mlcloud.errors import StoreUnavailable

    monkeypatch.setenv("MLCLOUD_DB_BUSY_TIMEOUT", "1")
    store = state.open_store()
    store.create_cluster("a", "a-1", "local", {}, "me")
    (backend,) = store._read("SELECT pg_backend_pid()")[0]
    os.kill(backend, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="cannot be reached"):
            store.list_clusters()
        assert time.monotonic() - started < 10
    finally:
        os.kill(backend, signal.SIGCONT)
    assert [c.name for c in state.open_store().list_clusters()] == ["a"]  # the others go on


def test_status_says_who_made_each_cluster_and_mine_filters(pg_url):
    import psycopg

    store = state.open_store()
    store.create_cluster("ours", "ours-1", "local", {}, "me")
    store.create_cluster("theirs", "theirs-1", "local", {}, "me")
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE clusters SET made_by='bob@ci-runner-7' WHERE name='theirs'")
    listed = json.loads(run_cli("status", "--json").stdout)["clusters"]
    assert {c["name"]: c["made_by"] for c in listed} == {
        "ours": state.whoami(),
        "theirs": "bob@ci-runner-7",
    }
    mine = json.loads(run_cli("status", "--mine", "--json").stdout)["clusters"]
    assert [c["name"] for c in mine] == ["ours"]
    assert "bob@ci-runner-7" in run_cli("status").stdout
