"""Pulls in state: which job's outputs came home, from which nodes, and when (`down` asks
about the newest job when some node's were not pulled since it ended)."""

from __future__ import annotations

import sqlite3

from mlcloud import state
from mlcloud.jobs import pull


def _cluster(home, nodes: int = 2) -> state.Store:
    home.mkdir(parents=True, exist_ok=True)
    s = state.Store(home / "state.db")
    s.create_cluster("c", "c-1", "local", {}, "me")
    s.set_nodes(
        "c",
        [state.NodeRecord(i, f"n{i}", "ip", "ip", "/r", 0, None, "running") for i in range(nodes)],
    )
    return s


def test_the_newest_job_is_unpulled_until_every_node_is_pulled_after_it_ended(mlcloud_home):
    s = _cluster(mlcloud_home)
    assert pull.unpulled(s, "c") is None  # no job, nothing to lose
    job = s.new_job("c", "c-1", "train.py", 2, 1, mlcloud_home)
    assert pull.unpulled(s, "c") == 1
    s.record_pull("c", "c-1", 1, "/d", {0: (3, 100)})
    assert pull.unpulled(s, "c") == 1  # node1 still holds what nobody pulled
    s.record_pull("c", "c-1", 1, "/d", {1: (3, 100)})
    assert pull.unpulled(s, "c") is None
    # the job went on writing after those pulls: they do not count
    s.update_job("c", "c-1", job.job_id, status=state.JOB_SUCCEEDED, ended=job.submitted + 1e6)
    assert pull.unpulled(s, "c") == 1
    s.new_job("c", "c-1", "train.py", 2, 1, mlcloud_home)
    assert pull.unpulled(s, "c") == 2  # the newest job is the one asked about
    assert pull.unpulled(s, "nope") is None


def test_version_4_gains_the_pulls_table(mlcloud_home):
    path = mlcloud_home / "state.db"
    mlcloud_home.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE clusters (name TEXT PRIMARY KEY); PRAGMA user_version=4;")
    db.close()
    s = state.Store(path)
    s.record_pull("c", "u", 1, "/d", {0: (1, 2)})
    assert s.pulled_nodes("c", "u", 1, since=0) == {0}
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == state.SCHEMA_VERSION
