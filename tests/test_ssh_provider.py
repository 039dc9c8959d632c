"""The ssh provider's host parsing (what `--hosts` accepts comes back out of a node id) and
its claims: a host is held by one cluster, however many processes race for it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from mlcloud.providers.base import CapacityError, ClusterRef, ProvisionRequest, SshOptions
from mlcloud.providers.ssh import SshProvider, parse_host

from mlcloud.errors import UsageError

REF = ClusterRef("lab", "lab-1", "me")


@pytest.mark.parametrize(
    "text, user, host, port",
    [
        ("alice@10.0.0.5:2222", "alice", "10.0.0.5", 2222),
        ("gpu-box", None, "gpu-box", None),
        ("bob@[::1]:22", "bob", "::1", 22),
        ("[fe80::1]", None, "fe80::1", None),
    ],
)
def test_hosts_round_trip_through_node_ids(text, user, host, port):
    h = parse_host(text)
    assert (h.user, h.host, h.port) == (user, host, port)
    node = SshProvider()._node(REF, 0, text)
    assert parse_host(node.node_id) == h and node.ip == host


@pytest.mark.parametrize("text", ["a@@h", "h:0", "h:70000", "h:port", "a b", "::1:22"])
def test_bad_hosts_say_the_form(text):
    with pytest.raises(UsageError, match=r"\[user@\]host\[:port\]"):
        parse_host(text)


def test_a_type_without_a_provider_asks_for_one():
    from mlcloud.spec import plan
    from mlcloud.spec.task import GpuSpec, Resources, TaskSpec

    spec = TaskSpec(resources=Resources(gpus=GpuSpec("A100", 8), instance_type="p4d.24xlarge"))
    with pytest.raises(UsageError, match="needs a provider: add --provider aws"):
        plan.make(spec, default_region=lambda p: None)


HOSTS = ("u@127.0.0.2", "u@127.0.0.3", "u@127.0.0.4")

# One `up`'s claim, slowed between reading the registries and writing its own (where a claim
# made meanwhile by another process would go unseen), started when `go` appears.
CLAIM = """
import json, sys, time
from pathlib import Path
from mlcloud.providers.base import CapacityError, ClusterRef, ProvisionRequest, SshOptions
from mlcloud.providers.ssh import SshProvider

name, go, hosts = sys.argv[1], Path(sys.argv[2]), tuple(sys.argv[3:])
p = SshProvider()
write = p._write
p._write = lambda ref, data: (time.sleep(0.5), write(ref, data))
p._let_cluster_key_in = lambda *a: None  # the claims are the subject; the hosts are made up
ref = ClusterRef(name, name + "-1", "me")
req = ProvisionRequest(count=2, hosts=hosts, ssh=SshOptions())
while not go.exists():
    time.sleep(0.01)
p.prepare(ref, req)
try:
    print(json.dumps([n.node_id for n in p.create(ref, req, 2)]))
except CapacityError as e:
    print(json.dumps(str(e)))
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def kind(request):
    if request.param == "postgresql":
        request.getfixturevalue("pg_url")
    return request.param


def test_two_processes_racing_for_hosts_never_both_get_one(tmp_path, kind):
    """On a shared store the racers are two homes: the claims are exclusive across homes."""
    import os

    from mlcloud.state import files

    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM, name, str(go), *HOSTS],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, MLCLOUD_HOME=str(tmp_path / name))
            if kind == "postgresql"
            else None,
        )
        for name in ("a", "b")
    ]
    time.sleep(1.0)  # both waiting
    go.touch()
    got = [json.loads(r.communicate(timeout=60)[0]) for r in racers]
    assert all(r.returncode == 0 for r in racers)
    won = [g for g in got if isinstance(g, list)]
    assert len(won) == 1, got  # three hosts, two each: one claim, the other refused
    (lost,) = [g for g in got if isinstance(g, str)]
    assert "is held by cluster" in lost, lost
    claimed = []
    for name in ("a", "b"):
        reg = json.loads(files.read(SshProvider._registry(ClusterRef(name, f"{name}-1", ""))))
        claimed += [reg["hosts"][i] for i in reg["claimed"]]
    assert len(claimed) == len(set(claimed)) == 2, claimed


def test_a_host_another_cluster_holds_is_not_claimed_again():
    p = SshProvider()
    first, second = ClusterRef("a", "a-1", "me"), ClusterRef("b", "b-1", "me")
    req = ProvisionRequest(count=2, hosts=HOSTS, ssh=SshOptions())
    p.prepare(first, req)
    assert [n.ip for n in p.create(first, req, 2)] == ["127.0.0.2", "127.0.0.3"]
    # the same machines under another user and the default port written out
    other = ProvisionRequest(count=1, hosts=("v@127.0.0.3:22", "v@127.0.0.4"), ssh=SshOptions())
    p.prepare(second, other)
    assert [n.ip for n in p.create(second, other, 1)] == ["127.0.0.4"]
    with pytest.raises(CapacityError, match=r"v@127.0.0.3:22 is held by cluster a"):
        p.create(second, other, 1)
