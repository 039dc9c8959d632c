"""State: intent rows, jobs, events; races between processes; busy database messages."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from mlcloud import state
from mlcloud.errors import BusyError


def _store(home):
    home.mkdir(parents=True, exist_ok=True)
    return state.Store(home / "state.db")


@pytest.fixture(params=["sqlite", "postgresql"])
def kind(request):
    """The store the test runs on: each test of state's contract runs on both."""
    if request.param == "postgresql":
        request.getfixturevalue("pg_url")
    return request.param


def _open(home):
    """The store this home uses (MLCLOUD_STATE_URL, set by pg_url, picks PostgreSQL)."""
    home.mkdir(parents=True, exist_ok=True)
    return state.open_store()


def test_cluster_lifecycle(mlcloud_home, kind):
    s = _open(mlcloud_home)
    s.create_cluster("a", "a-1", "local", {"nodes": 2}, "me")
    rec = s.get_cluster("a")
    assert rec and rec.status == state.INIT and rec.spec == {"nodes": 2}
    s.set_nodes("a", [state.NodeRecord(0, "n0", "1.2.3.4", "10.0.0.1", "/r", 1, "A100", "running")])
    s.set_status("a", state.UP)
    rec = s.get_cluster("a")
    assert rec.status == state.UP and rec.nodes[0].gpu_type == "A100"
    with pytest.raises(state.ClusterExists):
        s.create_cluster("a", "a-2", "local", {}, "me")
    s.delete_cluster("a")
    assert s.get_cluster("a") is None
    kinds = [k for _, k, _ in s.events("a")]
    assert kinds == ["intent", "deleted"]
    if kind == "sqlite":
        assert (mlcloud_home / "state.db").stat().st_mode & 0o077 == 0
    assert s.schema_version() == state.SCHEMA_VERSION


def test_jobs_number_per_cluster_and_outlive_it(mlcloud_home, kind):
    s = _open(mlcloud_home)
    s.create_cluster("a", "a-1", "local", {}, "me")
    j1 = s.new_job("a", "u1", "train.py", 2, 2, mlcloud_home)
    j2 = s.new_job("a", "u1", "train.py", 2, 2, mlcloud_home)
    assert (j1.job_id, j2.job_id) == (1, 2)
    s.update_job("a", "u1", 2, status=state.JOB_FAILED, exit_code=3)
    assert s.get_job("a").exit_code == 3
    s.delete_cluster("a")
    assert [j.job_id for j in s.jobs("a")] == [1, 2]  # logs stay readable after down


def _create(home, name, uid, results):
    s = state.open_store()
    try:
        s.create_cluster(name, uid, "local", {}, "me")
        results.put("created")
    except state.ClusterExists:
        results.put("exists")


def test_racing_creates_leave_one_row(mlcloud_home, kind):
    _open(mlcloud_home)
    results = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=_create, args=(mlcloud_home, "race", f"race-{i}", results))
        for i in range(6)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes.count("created") == 1 and outcomes.count("exists") == 5
    assert len(_open(mlcloud_home).list_clusters()) == 1


def test_busy_database_is_a_clear_error(mlcloud_home):
    s = _store(mlcloud_home)
    holder = sqlite3.connect(mlcloud_home / "state.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        quick = state.Store(mlcloud_home / "state.db", busy_timeout=0.2)
        with pytest.raises(BusyError, match="busy") as e:
            quick.create_cluster("b", "b-1", "local", {}, "me")
        assert "database is locked" not in str(e.value)
    finally:
        holder.execute("ROLLBACK")
    s.create_cluster("b", "b-1", "local", {}, "me")


def test_a_cluster_made_again_starts_its_own_jobs(mlcloud_home, kind):
    s = _open(mlcloud_home)
    s.create_cluster("a", "a-1", "local", {}, "me")
    s.new_job("a", "a-1", "train.py", 1, 1, mlcloud_home)
    s.new_job("a", "a-1", "train.py", 1, 1, mlcloud_home)
    s.delete_cluster("a")
    s.create_cluster("a", "a-2", "local", {}, "me")
    j = s.new_job("a", "a-2", "train.py", 1, 1, mlcloud_home)
    assert j.job_id == 1 and j.log_path != s.jobs("a", "a-1")[0].log_path
    assert [x.job_id for x in s.jobs("a", "a-2")] == [1]
    assert s.get_job("a", 2, "a-2") is None
    assert s.get_job("a").uid == "a-2"  # the newest incarnation by default


def test_version_2_database_is_migrated(mlcloud_home):
    import sqlite3

    path = mlcloud_home / "state.db"
    mlcloud_home.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE nodes (cluster TEXT, idx INTEGER, node_id TEXT, ip TEXT,
        private_ip TEXT, root TEXT, gpus INTEGER, gpu_type TEXT, status TEXT);
        CREATE TABLE jobs (cluster TEXT NOT NULL, job_id INTEGER NOT NULL, status TEXT NOT NULL,
        command TEXT NOT NULL, num_nodes INTEGER NOT NULL, nproc_per_node INTEGER NOT NULL,
        submitted REAL NOT NULL, ended REAL, exit_code INTEGER, log_path TEXT NOT NULL,
        driver_pid INTEGER, PRIMARY KEY (cluster, job_id));
        INSERT INTO jobs VALUES ('a', 1, 'SUCCEEDED', 'x.py', 1, 1, 1.0, 2.0, 0, '/l', NULL);
        PRAGMA user_version=2;"""
    )
    db.close()
    s = state.Store(path)
    (old,) = s.jobs("a")
    assert (old.uid, old.job_id, old.exit_code) == ("", 1, 0)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == state.SCHEMA_VERSION


def test_env_values_are_never_stored(mlcloud_home):
    s = _store(mlcloud_home)
    s.create_cluster("a", "a-1", "local", {"envs": {"TOKEN": "s3cr3t"}}, "me")
    s.set_spec("a", {"envs": {"TOKEN": "s3cr3t", "B": "also-secret"}})
    assert s.get_cluster("a").spec["envs"] == ["B", "TOKEN"]
    s.db.close()
    data = b"".join(p.read_bytes() for p in mlcloud_home.glob("state.db*"))
    assert b"s3cr3t" not in data and b"also-secret" not in data


def test_version_5_request_files_lose_their_env_values(mlcloud_home, tmp_path):
    """Saved job requests of older versions held the --env values: the migration keeps the
    names only, and a request file that is gone is no error."""
    import json

    s = _store(mlcloud_home)
    job = s.new_job("a", "a-1", "train.py", 1, 1, tmp_path)
    gone = s.new_job("a", "a-1", "train.py", 1, 1, tmp_path)
    request = Path(job.log_path + ".request.json")
    request.write_text(json.dumps({"script": "t.py", "envs": {"TOKEN": "s3cr3t", "B": "x"}}))
    s.db.execute("PRAGMA user_version=5")
    s.db.commit()
    s.close()
    assert gone.log_path != job.log_path
    s = state.Store(mlcloud_home / "state.db")
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == state.SCHEMA_VERSION
    assert json.loads(request.read_text()) == {"script": "t.py", "env_names": ["B", "TOKEN"]}


def test_version_3_events_get_a_node_and_node_events_merge_once(mlcloud_home):
    path = mlcloud_home / "state.db"
    mlcloud_home.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, cluster TEXT NOT NULL,
        uid TEXT NOT NULL, time REAL NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL);
        INSERT INTO events (cluster, uid, time, kind, message) VALUES ('c', 'u', 1.0, 'up', 'x');
        PRAGMA user_version=3;"""
    )
    db.close()
    s = state.Store(path)
    assert s.event_log("c", "u") == [(1.0, "up", None, "x")]
    node_events = [(2.0, "idle_teardown", 1, "idle"), (3.0, "stall", 0, "stalled")]
    assert s.merge_events("c", "u", node_events) == 2
    assert s.merge_events("c", "u", node_events[:1] + [(4.0, "stall", 0, "again")]) == 1
    assert [e[1:3] for e in s.event_log("c", "u")] == [
        ("up", None),
        ("idle_teardown", 1),
        ("stall", 0),
        ("stall", 0),
    ]


def test_node_rows_of_older_versions_read_as_mlclouds_states(mlcloud_home, kind):
    """Rows once kept the cloud's words (EC2's, GCE's lowercased): read as mlcloud's own."""
    s = _open(mlcloud_home)
    s.create_cluster("a", "a-1", "aws", {}, "me")
    words = ["shutting-down", "provisioning", "suspended", "running", "terminated", "odd"]
    s.set_nodes(
        "a",
        [state.NodeRecord(i, f"n{i}", "ip", "ip", "/r", 0, None, w) for i, w in enumerate(words)],
    )
    got = [n.status for n in s.get_cluster("a").nodes]
    assert got == ["stopping", "pending", "stopped", "running", "terminated", "running"]


def test_billing_numbers_claims_and_merged_events(mlcloud_home, kind):
    """The statements whose SQL differs most between the stores: null-safe equality (`IS ?`),
    billing's `end`, read-modify-writes."""
    from mlcloud.spec.cost import Interval

    s = _open(mlcloud_home)
    s.create_cluster("a", "a-1", "aws", {}, "me")
    assert s.get_cluster("a").made_by == state.whoami()
    assert (s.number_nodes("a", 2), s.number_nodes("a", 1, floor=5)) == (0, 5)
    s.open_billing(
        [Interval("a", "a-1", "aws", f"i-{i}", "p4d", "r", 1.5, 10.0, None) for i in (0, 1)]
    )
    s.close_node_billing("a-1", "i-0", 20.0)
    s.close_billing("a-1", 30.0)
    assert [(b.node_id, b.end) for b in s.billing("a")] == [("i-0", 20.0), ("i-1", 30.0)]
    job = s.new_job("a", "a-1", "train.py", 1, 1, mlcloud_home)
    assert s.claim_job("a", "a-1", job.job_id, None, 123)
    assert not s.claim_job("a", "a-1", job.job_id, None, 456)
    assert s.claim_job("a", "a-1", job.job_id, 123, None)
    events = [(2.0, "stall", None, "x"), (3.0, "idle_teardown", 1, "idle")]
    assert s.merge_events("a", "a-1", events) == 2
    assert s.merge_events("a", "a-1", events) == 0
    assert s.last_uid("a") == "a-1"
