"""The real `mlcloud` process against the fake Compute API (MLCLOUD_GCE_API_ENDPOINT, a
service-account key in GOOGLE_APPLICATION_CREDENTIALS), with VMs reached through a proxy
command that routes their addresses to loopback sshd nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from conftest import MLCLOUD, relay_pool, run_cli

from mlcloud.spec import catalog

pytestmark = pytest.mark.e2e
T4 = "n1-standard-8+T4:1"


def up_args(name, nodes, proxy, count, *extra, what=("--instance-type", T4)) -> list[str]:
    return [
        "up",
        name,
        "--provider",
        "gce",
        "--nodes",
        str(count),
        *what,
        "--identity",
        str(nodes.client_key),
        "--ssh-user",
        nodes.user,
        "--ssh-port",
        str(nodes.port),
        "--proxy-command",
        proxy,
        "--allow-ssh-from",
        "127.0.0.1/32",
        "--yes",
        *extra,
    ]


def test_up_fails_over_trains_ddp_across_two_vms_and_down_leaves_nothing(
    gce_env, make_ssh_nodes, tmp_path
):
    fake = gce_env.fake
    fake.exhaust("us-central1-a")  # the catalog's first zone for the type
    nodes = make_ssh_nodes(2)
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    assert run_cli("init", str(tmp_path / "proj")).returncode == 0
    spec = tmp_path / "budget.yaml"
    fake.create_bucket("ckpt-eu")
    spec.write_text(
        "autoscale:\n  max_cost: 10\n"
        "storage:\n  checkpoints: {aws: s3://ckpt-us/runs, gce: gs://ckpt-eu/runs}\n"
    )
    r = run_cli(*up_args("ddp", nodes, proxy, 2, "-f", str(spec), "--region", "us-central1"))
    assert r.returncode == 0, r.stderr
    assert "us-central1-a" in r.stderr and "trying elsewhere" in r.stderr
    vms = fake.instances()
    assert {vm["zone"].rpartition("/")[2] for vm in vms} == {"us-central1-b"}
    # the VMs run as the cluster's own service account, granted its gce location only
    (account,) = fake.service_accounts()
    assert {vm["serviceAccounts"][0]["email"] for vm in vms} == {account["email"]}
    granted = [b for b in fake.bucket_policy("ckpt-eu")["bindings"] if "condition" in b]
    assert [b["role"] for b in granted] == ["roles/storage.objectAdmin"]
    assert '"projects/_/buckets/ckpt-eu/objects/runs/"' in granted[0]["condition"]["expression"]
    # GCE itself deletes the VMs when the budget is spent at the cluster's $/h
    price = catalog.lookup(catalog.load(), "gce", T4, "us-central1").on_demand
    expect = 10 / (2 * price) * 3600
    for vm in vms:
        s = vm["scheduling"]
        assert abs(int(s["maxRunDuration"]["seconds"]) - expect) < 120
        assert s["instanceTerminationAction"] == "DELETE"
    st = json.loads(run_cli("status", "--json").stdout)["clusters"][0]
    assert st["provider"] == "gce" and st["num_nodes"] == 2
    r = run_cli(
        "train",
        "ddp",
        "-w",
        str(tmp_path / "proj"),
        "--nproc-per-node",
        "2",
        "--env",
        f"STORAGE_EMULATOR_HOST={gce_env.url}",  # the nodes reach the fake's Cloud Storage
        "--down",
        "train.py",
        "--",
        "--steps",
        "30",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert sorted(int(m) for m in re.findall(r"\] rank (\d)/4 ", r.stdout)) == [0, 1, 2, 3]
    assert "done steps=30 world_size=4" in r.stdout
    assert "uploaded to gs://ckpt-eu/runs/ddp" in r.stdout  # the node side, its cloud's bucket
    assert "runs/ddp/latest.json" in {k.split("/", 1)[1] for k in fake.objects("ckpt-eu")}
    assert fake.is_empty()  # --down: VMs, firewall rules and the service account
    assert not [b for b in fake.bucket_policy("ckpt-eu")["bindings"] if "condition" in b]
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []


def test_gpu_ask_up_killed_mid_way_then_down_leaves_nothing(gce_env, make_ssh_nodes, tmp_path):
    fake = gce_env.fake
    nodes = make_ssh_nodes(2)
    _, proxy = relay_pool(tmp_path, [])  # nothing routed: the VMs never answer SSH
    proc = subprocess.Popen(  # the catalog picks the type and region
        [MLCLOUD, *up_args("crash", nodes, proxy, 2, what=("--gpus", "T4:4"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    deadline = time.time() + 60
    while len(fake.instances()) < 2 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # right after bulkInsert, mid-bootstrap
    proc.wait(10)
    vms = fake.instances()
    assert len(vms) == 2 and fake.firewalls()
    assert vms[0]["machineType"].endswith("/n1-standard-16")  # n1-standard-16+T4:4
    assert vms[0]["guestAccelerators"][0]["acceleratorCount"] == 4
    r = run_cli("down", "crash", "--yes")
    assert r.returncode == 0, r.stderr
    assert fake.is_empty()
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
