"""`mlcloud autoscale --once` on real OpenSSH nodes: a node that stops answering is lost after
two consecutive checks and replaced by a spare host; every decision is an event."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, ssh_up_args

from mlcloud import state

pytestmark = pytest.mark.e2e


def nodes_of(name: str) -> list[str]:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    (c,) = [c for c in json.loads(r.stdout)["clusters"] if c["name"] == name]
    return [n["ip"] for n in c["nodes"]]


def test_once_replaces_a_lost_node_with_a_spare(make_ssh_nodes):
    nodes = make_ssh_nodes(3)
    r = run_cli(*ssh_up_args(nodes, "el"), "--nodes", "1:2")
    assert r.returncode == 0, r.stderr
    a, b, spare = nodes.hosts
    assert nodes_of("el") == [a, b]  # the third is the spare

    r = run_cli("autoscale", "el", "--once")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr

    nodes.kill(1)  # sshd and everything it started on the second host
    r = run_cli("autoscale", "el", "--once")  # one miss: not lost yet
    assert r.returncode == 0, r.stderr
    assert nodes_of("el") == [a, b]
    r = run_cli("autoscale", "el", "--once")  # the second in a row: replaced
    assert r.returncode == 0, r.stderr
    assert nodes_of("el") == [a, spare], r.stderr
    assert "unreachable for 2 consecutive checks" in r.stderr

    events = [(k, m) for _, k, m in state.open_store().events("el")]
    assert ("node_lost", next(m for k, m in events if k == "node_lost")) in events
    assert any(k == "node_replaced" and spare in m for k, m in events), events
    # the new node is a full node: bootstrapped, reachable, nothing more to do; its agent
    # knows it by its own number (the spare's place in the host list), not by its batch's
    replaced = next(m for k, m in events if k == "node_replaced")
    old_id, new_id = replaced.split(": ", 1)[1].split(" replaced by ")
    assert old_id != new_id, replaced
    r = run_cli("exec", "el", "--json", "cat ../agent/config.json")
    assert r.returncode == 0, r.stderr
    confs = [json.loads(n["stdout"]) for n in json.loads(r.stdout)["nodes"]]
    assert [c["node"] for c in confs] == [0, 2], confs
    assert confs[1]["node_id"] == new_id, (confs[1], replaced)
    r = run_cli("exec", "el", "--", "hostname -I || true")
    assert r.returncode == 0, r.stderr
    r = run_cli("autoscale", "el", "--once")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
    # no spare left: the next loss is dropped, the cluster goes on with one node
    nodes.kill(2)
    for _ in range(2):
        r = run_cli("autoscale", "el", "--once")
        assert r.returncode == 0, r.stderr
    assert nodes_of("el") == [a]
    assert "no spare left" in r.stderr

    # the lost hosts were never cleaned (unreachable); back, `down` cleans them
    nodes.restart(1)
    nodes.restart(2)
    r = run_cli("down", "el", "--yes")
    assert r.returncode == 0, r.stderr
