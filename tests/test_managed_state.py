"""The managed jobs' state (schema 9): a job and its clusters in order, on SQLite and on
PostgreSQL, and a version 8 home migrated."""

from __future__ import annotations

import sqlite3

import pytest
import test_state

from mlcloud import state

kind = test_state.kind  # each test on both stores, as state's contract tests
_open = test_state._open


def test_a_job_and_its_clusters_in_order(mlcloud_home, kind):
    s = _open(mlcloud_home)
    name = f"mj-{kind[:2]}"
    job = s.create_managed(name, {"envs": {"TOKEN": "secret"}}, {"script": "t.py"}, 2.5, "1@h")
    assert (job.status, job.restarts, job.clusters, job.current) == (state.JOB_RUNNING, 0, (), None)
    assert job.spec == {"envs": ["TOKEN"]}  # names only, as for clusters
    with pytest.raises(state.ClusterExists):
        s.create_managed(name, {}, {}, None, "2@h")
    first = s.add_managed_cluster(name, "aws", "us-east-1", "us-east-1a", 1.0)
    assert (first.seq, first.cluster) == (1, f"{name}-1")
    s.update_managed_cluster(name, 1, uid="u1", ended=5.0, why="lost")
    s.add_managed_cluster(name, "gce", "europe-west4", "", 0.5)
    s.update_managed(name, restarts=1, steps_lost=7)
    assert s.claim_managed(name, "1@h", "3@h") and not s.claim_managed(name, "1@h", "4@h")
    job = s.get_managed(name)
    assert [(c.cluster, c.provider, c.why, c.uid) for c in job.clusters] == [
        (f"{name}-1", "aws", "lost", "u1"),
        (f"{name}-2", "gce", "", ""),
    ]
    assert job.current.seq == 2 and (job.restarts, job.steps_lost, job.watcher) == (1, 7, "3@h")
    assert s.managed_of(f"{name}-2") == name and s.managed_of("other") is None
    assert [j.name for j in s.list_managed() if j.name == name] == [name]
    s.update_managed(name, status=state.JOB_SUCCEEDED, exit_code=0, ended=9.0)
    again = s.create_managed(name, {}, {}, None, "5@h")  # an ended job's name is free again
    assert again.clusters == () and again.status == state.JOB_RUNNING


def test_version_8_home_gets_the_managed_tables(mlcloud_home):
    mlcloud_home.mkdir(parents=True, exist_ok=True)
    path = mlcloud_home / "state.db"
    state.Store(path).close()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE managed_clusters; DROP TABLE managed_jobs; PRAGMA user_version=8;")
    db.close()
    s = state.Store(path)
    assert s.schema_version() == state.SCHEMA_VERSION == 9
    assert s.list_managed() == []
