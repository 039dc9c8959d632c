"""Elastic control on EC2, end to end: the real `mlcloud` against a plain moto server behind
the idempotency stand-in (tests/fakes/ec2_tokens.py), instances reached through a proxy
command that routes their addresses to loopback sshd nodes. A lost node is replaced by a new
instance that is bootstrapped, again and again; `down` during a replacement leaves the cloud
empty; a failed bootstrap leaves no instance and nothing billing."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import time
from pathlib import Path

import pytest
from conftest import MLCLOUD, relay_pool, run_cli
from test_aws_cli import ec2, live_instances, mlcloud_resources, up_args

from mlcloud import state

pytestmark = pytest.mark.e2e

EMPTY = {"instances": 0, "security_groups": 0, "key_pairs": 0}


def cluster(name: str) -> dict:
    (c,) = [c for c in json.loads(run_cli("status", "--json").stdout)["clusters"]]
    assert c["name"] == name
    return c


def all_instances() -> list[dict]:
    """Every instance moto holds, terminated ones too: what was ever launched."""
    return [i for r in ec2().describe_instances()["Reservations"] for i in r["Instances"]]


def lose(instance_id: str) -> None:
    """Terminated behind mlcloud's back, as a Spot reclaim or a console click would."""
    c = ec2()
    c.terminate_instances(InstanceIds=[instance_id])
    c.get_waiter("instance_terminated").wait(
        InstanceIds=[instance_id], WaiterConfig={"Delay": 0.2, "MaxAttempts": 100}
    )


def once(name: str) -> dict:
    r = run_cli("autoscale", name, "--once", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_lost_node_is_replaced_then_its_replacement_then_down_during_a_third(
    moto_server, ec2_stand_in, make_ssh_nodes, tmp_path
):
    nodes = make_ssh_nodes(4)  # two for `up`, one for each replacement; the third: none
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    r = run_cli(*up_args("heal", nodes, proxy, 2))
    assert r.returncode == 0, r.stderr
    uid = cluster("heal")["uid"]
    for k in (2, 3):  # the replacement's number: never one the cluster used before
        before = [n["id"] for n in cluster("heal")["nodes"]]
        lose(before[1])
        (action,) = once("heal")["actions"]
        assert action["kind"] == "replace" and action["node"] == 1, action
        after = [n["id"] for n in cluster("heal")["nodes"]]
        assert after[0] == before[0] and after[1] not in before
        assert sorted(i["InstanceId"] for i in live_instances()) == sorted(after)
        r = run_cli("exec", "heal", "--json", "pwd")  # through each node's node_ctl.py
        assert r.returncode == 0, r.stderr
        answers = [Path(n["stdout"].strip()) for n in json.loads(r.stdout)["nodes"]]
        assert [(p.parent.parent.name, p.parent.name) for p in answers] == [
            (uid, "node-0"),
            (uid, f"node-{k}"),
        ]
    # one RunInstances for `up`, one per replacement, and nothing else launched
    assert ec2_stand_in.launches == 3 and ec2_stand_in.replays == 0
    assert len(all_instances()) == 4
    # lost a third time: no route is left, so its replacement waits in bootstrap for an
    # instance that never answers, and `down` comes meanwhile
    lose(cluster("heal")["nodes"][1]["id"])
    autoscale = subprocess.Popen(
        [MLCLOUD, "autoscale", "heal", "--once"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        deadline = time.monotonic() + 60
        while len(live_instances()) < 2:  # the replacement is launched: now bootstrapping
            assert autoscale.poll() is None and time.monotonic() < deadline, autoscale.stderr
            time.sleep(0.1)
        r = run_cli("down", "heal", "--yes")
        assert r.returncode == 0, r.stderr  # never "busy"
        autoscale.wait(60)
    finally:
        if autoscale.poll() is None:
            autoscale.kill()
            autoscale.wait()
    assert mlcloud_resources() == EMPTY
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
    assert ec2_stand_in.launches == 4 and len(all_instances()) == 5


def test_a_failed_bootstrap_of_a_replacement_leaves_no_instance_billing(
    moto_server, ec2_stand_in, make_ssh_nodes, tmp_path, mlcloud_home
):
    nodes = make_ssh_nodes(3)
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    assert run_cli(*up_args("nogo", nodes, proxy, 2)).returncode == 0
    c = cluster("nogo")
    # the replacement (node-2) cannot make its directory: its bootstrap fails on the node
    blocker = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".mlcloud" / c["uid"] / "node-2"
    blocker.write_text("not a directory\n")
    try:
        survivor, lost = (n["id"] for n in c["nodes"])
        lose(lost)
        (action,) = once("nogo")["actions"]
        assert action["kind"] == "replace"
        assert [i["InstanceId"] for i in live_instances()] == [survivor]
        assert ec2_stand_in.launches == 2  # the replacement was made, then terminated
        store = state.open_store()
        billing = [i for i in store.billing("nogo") if i.uid == c["uid"]]
        assert [i.node_id for i in billing if i.end is None] == [survivor]
        # the replacement never joined the cluster: no billing row
        assert {i.node_id for i in billing} == {survivor, lost}
        assert [n.node_id for n in store.get_cluster("nogo").nodes] == [survivor]
        said = [m for _, kind, m in store.events("nogo") if kind == "node_lost"]
        assert any("could not be replaced" in m for m in said), said
    finally:
        blocker.unlink()
    assert run_cli("down", "nogo", "--yes").returncode == 0
    assert mlcloud_resources() == EMPTY


def test_a_resumed_up_whose_instances_were_terminated_launches_anew(
    moto_server, ec2_stand_in, make_ssh_nodes, tmp_path
):
    """Killed mid-bootstrap, its instances terminated before the re-run: the re-run asks with
    new node numbers, so a new ClientToken, not the first launch's (EC2 would hand back the
    terminated instances and launch nothing)."""
    nodes = make_ssh_nodes(2)
    pool, proxy = relay_pool(tmp_path, [])  # nothing routed yet: `up` waits in bootstrap
    proc = subprocess.Popen(
        [MLCLOUD, *up_args("again", nodes, proxy, 2)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        for line in proc.stderr:
            if line.startswith("waiting for 2 node(s)"):
                break
    finally:
        proc.kill()  # kill -9: no rollback
        proc.wait()
    first = [i["InstanceId"] for i in live_instances()]
    for instance_id in first:
        lose(instance_id)
    pool.write_text(json.dumps({"pool": [n.host for n in nodes.nodes], "routes": {}}))
    r = run_cli(*up_args("again", nodes, proxy, 2))
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr
    assert ec2_stand_in.launches == 2 and ec2_stand_in.replays == 0
    again = cluster("again")
    assert {n["id"] for n in again["nodes"]}.isdisjoint(first) and len(again["nodes"]) == 2
    assert run_cli("down", "again", "--yes").returncode == 0
    assert mlcloud_resources() == EMPTY
