"""One GCE create attempt through the real google-cloud-compute client against the fake Compute
API: a failed attempt deletes only the VMs it asked for, its request id is its own, a Spot VM
reclaimed while starting is a refusal of the zone, a throttled operation is asked again."""

from __future__ import annotations

from dataclasses import replace

import pytest
from mlcloud.providers.base import CapacityError, ClusterRef, ProvisionRequest, SshOptions
from mlcloud.providers.gce import api, rules
from mlcloud.providers.gce.provider import GceProvider

REF = ClusterRef("grow", "grow-0123abcd", "home1", "us-central1")
T4 = "n1-standard-8+T4:1"
ZONE_A, ZONE_B = "us-central1-a", "us-central1-b"


def request(**kw) -> ProvisionRequest:
    base = ProvisionRequest(
        count=2,
        instance_type=T4,
        region="us-central1",
        zone=ZONE_A,
        ssh=SshOptions(allowed_cidrs=("127.0.0.1/32",)),
    )
    return replace(base, **kw)


@pytest.fixture
def cluster(gce_env, mlcloud_home):
    """A provider and a running 2-VM cluster in ZONE_A (nodes 0 and 1)."""
    p = GceProvider()
    req = p.prepare(REF, request()).request
    nodes = p.create(REF, req, 2)
    return p, req, nodes


def vms(fake) -> dict[str, tuple[str, str]]:
    """name -> (id, status): a VM deleted and made again has a new id."""
    return {vm["name"]: (vm["id"], vm["status"]) for vm in fake.instances()}


def inserts(fake) -> list:
    return fake.calls("POST", r"/bulkInsert$")


def test_a_refused_grow_leaves_the_running_vms_untouched(gce_env, cluster):
    fake, (p, req, nodes) = gce_env.fake, cluster
    before = vms(fake)
    fake.exhaust(ZONE_A)  # the cluster's own zone: add_nodes tries it first
    with pytest.raises(CapacityError) as e:
        p.create(REF, replace(req, first_number=2), 1)
    assert e.value.zone == ZONE_A
    assert vms(fake) == before and all(s == "RUNNING" for _, s in before.values())
    assert fake.calls("DELETE") == []  # not even asked
    assert p.list(REF) == nodes


def test_a_spot_vm_reclaimed_while_starting_refuses_the_zone_and_only_its_attempt_goes(
    gce_env, cluster
):
    fake, (p, req, _) = gce_env.fake, cluster
    before = vms(fake)
    spot = replace(req, spot=True, first_number=2)
    fake.reclaim_while_starting(ZONE_A)  # the first of the two new VMs; the other runs
    with pytest.raises(CapacityError) as e:
        p.create(REF, spot, 2)
    assert e.value.zone == ZONE_A and "reclaimed while starting" in str(e.value)
    new = {rules.instance_name(REF.uid, k) for k in (2, 3)}
    reclaimed = {name for name in new if name in str(e.value)}
    assert len(reclaimed) == 1
    # all or nothing: the attempt's VM that ran is deleted too; the cluster's are not
    assert vms(fake) == before
    deleted = {c.path.rpartition("/")[2] for c in fake.calls("DELETE", r"/instances/")}
    assert deleted == new - reclaimed
    # the engine's next zone: new numbers, a new request
    more = p.create(REF, replace(spot, zone=ZONE_B, first_number=4), 2)
    assert [n.node_id for n in more] == [rules.instance_name(REF.uid, k) for k in (4, 5)]
    assert len({c.request_id for c in inserts(fake)}) == 3


def test_a_vm_stopped_by_the_cloud_while_starting_is_a_refusal_too(gce_env, cluster):
    """A Spot VM whose termination action is STOP ends TERMINATED, not deleted."""
    fake, (p, req, nodes) = gce_env.fake, cluster
    fake.reclaim_while_starting(ZONE_A)
    with pytest.raises(CapacityError):
        p.create(REF, replace(req, first_number=2), 1)  # on demand: STOP, as GCE's default
    assert set(vms(fake)) == {n.node_id for n in nodes}


def test_an_operation_that_ends_throttled_is_asked_again_as_a_new_request(
    gce_env, cluster, monkeypatch
):
    monkeypatch.setattr(api, "BACKOFF_S", 0.01)
    fake, (p, req, nodes) = gce_env.fake, cluster
    fake.clear_calls()
    fake.rate_limit_operations(2, zone=ZONE_A)
    more = p.create(REF, replace(req, first_number=2), 1)
    assert [n.node_id for n in more] == [rules.instance_name(REF.uid, 2)]
    ids = [c.request_id for c in inserts(fake)]
    assert len(ids) == 3 and len(set(ids)) == 3  # GCE would replay a throttled id's answer
    # throttled every time: one line, nothing made, the cluster as it was
    fake.clear_calls()
    fake.rate_limit_operations(api.RATE_RETRIES)
    with pytest.raises(api.OperationThrottled, match="RATE_LIMIT_EXCEEDED"):
        p.create(REF, replace(req, first_number=3), 1)
    assert len(inserts(fake)) == api.RATE_RETRIES
    assert sorted(vms(fake)) == sorted(n.node_id for n in [*nodes, *more])


def test_a_throttled_firewall_change_is_asked_again(gce_env, mlcloud_home, monkeypatch):
    monkeypatch.setattr(api, "BACKOFF_S", 0.01)
    fake, p = gce_env.fake, GceProvider()
    fake.rate_limit_operations(1)  # firewalls are global: any zone
    p.prepare(REF, request())
    assert len(fake.firewalls()) == 2
    firewall_posts = fake.calls("POST", r"/global/firewalls$")
    assert len(firewall_posts) == 3 and len({c.request_id for c in firewall_posts}) == 3


def test_every_growth_is_a_request_of_its_own_and_a_resumed_one_is_the_same(
    gce_env, cluster, monkeypatch
):
    """Node numbers are never given twice: each growth's request id is new. An attempt cut off
    before GCE answered (the command killed while it waited) sends the same id when resumed,
    so GCE makes its VMs once."""
    fake, (p, req, _) = gce_env.fake, cluster
    for k in (2, 3):
        p.create(REF, replace(req, first_number=k), 1)
    ids = [c.request_id for c in inserts(fake)]
    assert len(ids) == len(set(ids)) == 3

    def killed(self, op, zone, region):
        raise KeyboardInterrupt  # the command ended while it waited

    real_wait = api.Api.wait
    fake.late_bulk_instances = True  # listed once the operation ends, as GCE may
    fake.slow(1.0)
    fake.clear_calls()
    monkeypatch.setattr(api.Api, "wait", killed)
    with pytest.raises(KeyboardInterrupt):
        p.create(REF, replace(req, first_number=4), 1)
    monkeypatch.setattr(api.Api, "wait", real_wait)
    resumed = GceProvider().create(REF, replace(req, first_number=4), 1)  # nothing listed yet
    ids = [c.request_id for c in inserts(fake)]
    assert len(ids) == 2 and len(set(ids)) == 1
    assert [n.node_id for n in resumed] == [rules.instance_name(REF.uid, 4)]
    assert len(vms(fake)) == 5  # nodes 0 to 4, each made once


def test_a_throttled_deletion_is_asked_again_and_down_leaves_nothing(gce_env, cluster, monkeypatch):
    from mlcloud.providers.gce import provider

    monkeypatch.setattr(api, "BACKOFF_S", 0.01)
    monkeypatch.setattr(provider, "REASK_S", 0.3)
    fake, (p, _, nodes) = gce_env.fake, cluster
    fake.clear_calls()
    fake.rate_limit_operations(1, zone=ZONE_A)  # one VM's deletion: it stays RUNNING
    p.terminate(REF, nodes)
    assert fake.instances() == []
    assert len(fake.calls("DELETE", r"/instances/")) == 3
    fake.rate_limit_operations(1)  # a firewall rule's deletion
    p.cleanup(REF)
    assert fake.is_empty()
    assert len(fake.calls("DELETE", r"/global/firewalls/")) == 3
