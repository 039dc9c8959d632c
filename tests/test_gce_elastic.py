"""Elastic control on GCE, end to end: the real `mlcloud` process against the fake Compute API,
its VMs reached through a proxy command that routes their addresses to loopback sshd nodes
(as tests/test_gce_cli.py). `up` goes on past a throttled operation and past a zone where a
Spot VM was reclaimed while starting. A Spot VM reclaimed while no zone has room: the
survivor is kept and the event says why nothing replaced it; once one zone has room again, the
next pass makes a new VM in its place; a refused replacement or grow never touches the VMs
that run."""

from __future__ import annotations

import json

import pytest
from conftest import relay_pool, run_cli
from test_gce_cli import T4, up_args

from mlcloud import state
from mlcloud.spec import catalog

pytestmark = pytest.mark.e2e
REGION = "us-central1"


def running(fake) -> dict[str, tuple[str, str]]:
    """name -> (zone, id) of every VM: one deleted and made again has a new id."""
    return {vm["name"]: (vm["zone"].rpartition("/")[2], vm["id"]) for vm in fake.instances()}


def status(name: str) -> dict:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    (c,) = [c for c in json.loads(r.stdout)["clusters"] if c["name"] == name]
    return c


def events(name: str) -> list[tuple[str, str]]:
    return [(k, m) for _, k, m in state.open_store().events(name)]


def test_a_reclaimed_vm_waits_for_capacity_then_is_replaced_and_refusals_touch_nothing(
    gce_env, make_ssh_nodes, tmp_path
):
    fake = gce_env.fake
    zones = catalog.lookup(catalog.load(), "gce", T4, REGION).zones  # where mlcloud looks
    nodes = make_ssh_nodes(3)  # two VMs, and the one made in place of a reclaimed one
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    fake.rate_limit_operations(1)  # the first operation (a firewall rule) ends throttled
    fake.reclaim_while_starting(zones[0])  # and a Spot VM is reclaimed there as it starts
    r = run_cli(*up_args("el", nodes, proxy, 2, "--spot", "--region", REGION))
    assert r.returncode == 0, r.stderr
    assert f"GCE {zones[0]}: VM(s)" in r.stderr and "reclaimed while starting" in r.stderr
    first = running(fake)
    head, lost = sorted(first, key=lambda name: int(name.rpartition("-")[2]))
    zone = first[head][0]
    assert zone == zones[1] == first[lost][0]  # the next zone, where both run

    # reclaimed while every zone of the region is out of Spot capacity
    for z in zones:
        fake.exhaust(z)
    fake.preempt(zone, lost)
    fake.clear_calls()  # (up deleted a VM of the same name in the first zone)
    r = run_cli("autoscale", "el", "--once")
    assert r.returncode == 0, r.stderr
    assert running(fake) == {head: first[head]}  # the survivor, untouched
    assert fake.calls("DELETE", rf"/instances/{head}$") == []
    c = status("el")
    assert [n["id"] for n in c["nodes"]] == [head]
    assert c["status"] == "DEGRADED" and c["reason"] == "1 of 2 node(s) lost or stopped"
    why = [m for k, m in events("el") if k == "node_lost" and "could not be replaced" in m]
    assert len(why) == 1 and f"no capacity for 1 more x {T4} in {zone}" in why[0], events("el")
    refusals = [m for k, m in events("el") if k == "capacity"]
    assert "reclaimed while starting" in refusals[0]  # up's, in the first zone
    assert refusals[1:] and all("ZONE_RESOURCE_POOL_EXHAUSTED" in m for m in refusals[1:])

    # its zone has room again: the next pass makes a new VM there, bootstrapped
    fake.set_capacity(zone, None)
    r = run_cli("autoscale", "el", "--once")
    assert r.returncode == 0, r.stderr
    now = running(fake)
    (new,) = set(now) - {head}
    assert now[head] == first[head] and now[new][0] == zone and new != lost
    assert [n["id"] for n in status("el")["nodes"]] == [head, new]
    assert status("el")["status"] == "UP"
    assert any(k == "scale_up" and "in place of one lost" in m for k, m in events("el"))
    assert all(n["python"] for n in status("el")["nodes"])  # bootstrapped: its Python found
    r = run_cli("exec", "el", "--", "test -s ../agent/config.json && echo up")  # its agent
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.split()) == ["[node0]", "[node1]", "up", "up"], r.stdout

    # no room anywhere again: neither the refused replacement nor the refused grow after it
    # touches a VM that runs
    fake.exhaust(zone)
    fake.preempt(zone, new)
    fake.clear_calls()
    for _ in range(2):  # the replacement refused, then the grow to the cluster's size refused
        r = run_cli("autoscale", "el", "--once")
        assert r.returncode == 0, r.stderr
        assert running(fake) == {head: first[head]}
    assert fake.calls("DELETE", r"/instances/") == []
    refused = [m for k, m in events("el") if k == "scale_up" and "no node added" in m]
    assert len(refused) == 1 and "next try in" in refused[0], events("el")
    r = run_cli("down", "el", "--yes")
    assert r.returncode == 0, r.stderr
    assert fake.is_empty()
