"""A managed job on GCE (issue 20's acceptance), against the fake Compute API with its VMs on
loopback sshd nodes: its Spot VM is reclaimed while every zone of its region is out of
capacity, and the job moves to a cluster in another allowed region, finishes there, and
leaves nothing running."""

from __future__ import annotations

import json
import time

import pytest
from conftest import cli_process, relay_pool, relayed_node_args, run_cli
from test_gce_cli import T4
from test_managed_aws import JOB

from mlcloud import state
from mlcloud.spec import catalog

pytestmark = pytest.mark.e2e
PLACEMENTS = ("gce:us-central1", "gce:europe-west4")


def test_every_zone_exhausted_after_a_reclaim_moves_the_job_to_another_region(
    gce_env, make_ssh_nodes, tmp_path, monkeypatch
):
    fake = gce_env.fake
    monkeypatch.setenv("MLCLOUD_GCE_BILLING_ENDPOINT", gce_env.url)  # live prices: the fake's
    nodes = make_ssh_nodes(2)
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    project = tmp_path / "proj"
    project.mkdir()
    (project / "job.py").write_text(JOB)
    gate = tmp_path / "gate"
    spec = project / "mlcloud.yaml"
    spec.write_text(
        f"workdir: .\nprovider: gce\nspot: true\nresources: {{instance_type: '{T4}'}}\n"
        f"recover: {{placements: [{', '.join(PLACEMENTS)}]}}\n"
    )
    launch = cli_process(
        ["launch", "gm", "-f", str(spec), *relayed_node_args(nodes, proxy),
         "-e", f"GATE={gate}", "--yes", "job.py"],
        tmp_path,
    )  # fmt: skip

    def wait(cond, what: str) -> None:
        deadline = time.monotonic() + 180
        while not cond():
            assert launch.poll() is None, launch.communicate()[0][-4000:]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    try:
        store = state.open_store()
        wait(lambda: any(j.status == "RUNNING" for j in store.jobs("gm-1")), "the job on gm-1")
        rec = store.get_cluster("gm-1")
        region, (node,) = rec.spec["region"], rec.nodes
        for z in catalog.lookup(catalog.load(), "gce", T4, region).zones:
            fake.exhaust(z)  # nothing can replace it in its region
        fake.preempt(rec.spec["zone"], node.node_id)
        nodes.kill(0)
        wait(lambda: store.get_cluster("gm-2") is not None, "a new cluster")
        gate.touch()
        out, _ = launch.communicate(timeout=240)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    assert launch.returncode == 0, out[-4000:]
    (job,) = json.loads(run_cli("jobs", "--json").stdout)["jobs"]
    first, second = job["clusters"]
    assert (first["cluster"], first["why"]) == ("gm-1", "every node lost")
    assert first["where"].startswith(f"gce:{region}")
    assert second["where"].split(":")[1] != region
    assert f"gce:{second['where'].split(':')[1]}" in PLACEMENTS
    assert (job["status"], job["restarts"]) == ("SUCCEEDED", 1)
    assert fake.instances() == [] or all(vm["status"] == "TERMINATED" for vm in fake.instances())
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
