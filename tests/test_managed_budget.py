"""A managed job's budget (autoscale.max_cost) spans every cluster it made: once the billing
of its clusters reaches it, no new cluster is made and the job ends, said in an event; below
it, the new cluster's own budget is what is left."""

from __future__ import annotations

import time

from mlcloud import state
from mlcloud.control import managed
from mlcloud.jobs.launch import JobRequest
from mlcloud.report import PlainReporter
from mlcloud.spec.cost import Interval
from mlcloud.spec.task import AutoscaleSpec, TaskSpec


def _job(store: state.Store, name: str, spent_usd: float) -> None:
    """A managed job whose first cluster (gone) cost spent_usd: one node, one hour."""
    store.create_managed(name, {}, {"env_names": []}, None, managed.me())
    first = store.add_managed_cluster(name, "aws", "us-east-1", "us-east-1a", spent_usd)
    store.update_managed_cluster(name, first.seq, uid="u-1", ended=time.time(), why="lost")
    now = time.time()
    store.open_billing(
        [Interval(first.cluster, "u-1", "aws", "i-1", "g5.xlarge", "us-east-1", spent_usd,
                  now - 3600, None)]
    )  # fmt: skip
    store.close_billing("u-1", now)


def test_no_new_cluster_once_the_budget_is_spent(mlcloud_home, tmp_path):
    mlcloud_home.mkdir(parents=True)
    store = state.open_store()
    _job(store, "bg", 2.0)
    spec = TaskSpec(provider="local", autoscale=AutoscaleSpec(max_cost=2.0))
    req = JobRequest(tmp_path, "job.py", (), None, {}, None, None)
    w = managed.Watcher(store, "bg", spec, req, PlainReporter(quiet=True), None)
    job = store.get_managed("bg")
    assert abs(managed.spent(store, job) - 2.0) < 0.01
    assert w.make(job, job.clusters[0]) is None
    job = store.get_managed("bg")
    assert (job.status, job.exit_code, len(job.clusters)) == (state.JOB_FAILED, 1, 1)
    (said,) = [m for _, kind, m in store.events("bg-1") if kind == "budget"]
    assert said.startswith("$2.00 of $2.00 spent")
    assert store.list_clusters() == []


def test_a_new_cluster_gets_what_is_left_of_the_budget(mlcloud_home, tmp_path):
    from mlcloud.provision import lifecycle

    mlcloud_home.mkdir(parents=True)
    store = state.open_store()
    _job(store, "bh", 0.5)
    spec = TaskSpec(provider="local", autoscale=AutoscaleSpec(max_cost=2.0))
    req = JobRequest(tmp_path, "job.py", (), None, {}, None, None)
    w = managed.Watcher(store, "bh", spec, req, PlainReporter(quiet=True), None)
    job = store.get_managed("bh")
    try:
        made = w.make(job, job.clusters[0])
        assert made is not None and made.cluster == "bh-2"
        budget = store.get_cluster("bh-2").spec["autoscale"]["max_cost"]
        assert abs(budget - 1.5) < 0.01
        said = [m for _, kind, m in store.events("bh-2") if kind == "moved"]
        assert said and "moved from bh-1 (lost) to bh-2" in said[0]
    finally:
        lifecycle.down(store, "bh-2", PlainReporter(quiet=True))
