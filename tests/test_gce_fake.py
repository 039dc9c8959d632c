"""The fake Compute API driven by the REAL google-cloud-compute client and google-auth, with
credentials as a user's come (a service-account key file via google.auth.default())."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ZONE = "us-central1-a"
DL_FAMILY = "projects/deeplearning-platform-release/global/images/family/pytorch-latest-gpu"


class Clients:
    """The real clients, built the way the provider must: one ClientOptions for all."""

    def __init__(self, env):
        import google.auth
        from google.api_core.client_options import ClientOptions
        from google.cloud import compute_v1

        self.creds, self.project = google.auth.default()
        opts = ClientOptions(api_endpoint=env.url)
        kw = {"credentials": self.creds, "client_options": opts}
        self.c = compute_v1
        self.instances = compute_v1.InstancesClient(**kw)
        self.zone_ops = compute_v1.ZoneOperationsClient(**kw)
        self.global_ops = compute_v1.GlobalOperationsClient(**kw)
        self.firewalls = compute_v1.FirewallsClient(**kw)
        self.images = compute_v1.ImagesClient(**kw)
        self.zones = compute_v1.ZonesClient(**kw)
        self.regions = compute_v1.RegionsClient(**kw)

    def instance(self, name: str, zone: str = ZONE, labels=None, **extra):
        c = self.c
        fields = dict(
            name=name,
            machine_type=f"zones/{zone}/machineTypes/n1-standard-8",
            labels=labels or {"mlcloud-cluster": "c-1"},
            tags=c.Tags(items=["mlcloud-c-1"]),
            disks=[
                c.AttachedDisk(
                    boot=True,
                    auto_delete=True,
                    initialize_params=c.AttachedDiskInitializeParams(
                        source_image=DL_FAMILY, disk_size_gb=100
                    ),
                )
            ],
            network_interfaces=[
                c.NetworkInterface(access_configs=[c.AccessConfig(name="External NAT")])
            ],
            guest_accelerators=[
                c.AcceleratorConfig(
                    accelerator_type=f"zones/{zone}/acceleratorTypes/nvidia-tesla-t4",
                    accelerator_count=1,
                )
            ],
            metadata=c.Metadata(items=[c.Items(key="install-nvidia-driver", value="True")]),
            scheduling=c.Scheduling(on_host_maintenance="TERMINATE"),
        )
        return c.Instance(**{**fields, **extra})

    def insert(self, inst, zone: str = ZONE, request_id: str | None = None):
        req = self.c.InsertInstanceRequest(
            project=self.project,
            zone=zone,
            instance_resource=inst,
            request_id=request_id or str(uuid.uuid4()),
        )
        return self.instances.insert_unary(request=req)

    def wait(self, op, zone: str = ZONE):
        while op.status != self.c.Operation.Status.DONE:
            op = self.zone_ops.wait(project=self.project, zone=zone, operation=op.name)
        return op

    def names(self, zone: str = ZONE, flt: str = "", page: int = 0) -> list[str]:
        req = self.c.ListInstancesRequest(
            project=self.project, zone=zone, filter=flt, max_results=page
        )
        return [i.name for i in self.instances.list(request=req)]


@pytest.fixture
def gce(gce_env) -> Clients:
    return Clients(gce_env)


def test_insert_wait_get_list_delete(gce, gce_env):
    fake = gce_env.fake
    fake.slow(60)  # operations end when the test moves the fake's clock, not before

    def status():
        return gce.instances.get(project=gce.project, zone=ZONE, instance="vm-1").status

    op = gce.insert(gce.instance("vm-1"))
    assert op.status == gce.c.Operation.Status.RUNNING
    first = gce.instances.get(project=gce.project, zone=ZONE, instance="vm-1")
    assert first.status == "PROVISIONING"  # visible before the operation ends, as on GCE
    fake.advance_clock(30)
    assert status() == "STAGING"
    fake.advance_clock(30)
    done = gce.wait(op)
    assert not done.error.errors and done.target_id == first.id
    vm = gce.instances.get(project=gce.project, zone=ZONE, instance="vm-1")
    assert vm.status == "RUNNING" and done.progress == 100
    assert vm.zone.endswith(f"/projects/{gce.project}/zones/{ZONE}")
    assert vm.machine_type.endswith(f"/zones/{ZONE}/machineTypes/n1-standard-8")
    nic = vm.network_interfaces[0]
    assert nic.network_i_p.startswith("10.") and nic.access_configs[0].nat_i_p.startswith(
        "203.0.113."
    )
    assert vm.labels["mlcloud-cluster"] == "c-1" and list(vm.tags.items) == ["mlcloud-c-1"]
    assert vm.guest_accelerators[0].accelerator_type.endswith("/acceleratorTypes/nvidia-tesla-t4")
    assert vm.scheduling.on_host_maintenance == "TERMINATE"
    assert vm.metadata.items[0].key == "install-nvidia-driver"
    assert vm.disks[0].boot and vm.disks[0].disk_size_gb == 100

    assert gce.names() == ["vm-1"]
    delete = gce.instances.delete_unary(project=gce.project, zone=ZONE, instance="vm-1")
    assert status() == "STOPPING"
    fake.advance_clock(60)
    assert not gce.wait(delete).error.errors
    assert gce.names() == [] and fake.is_empty()
    from google.api_core.exceptions import NotFound

    with pytest.raises(NotFound, match="vm-1' was not found"):
        gce.instances.get(project=gce.project, zone=ZONE, instance="vm-1")


def test_list_filters_on_labels_and_pages(gce, gce_env):
    ops = [
        gce.insert(gce.instance(f"a-{i}", labels={"mlcloud-cluster": "a", "mlcloud-owner": "me"}))
        for i in range(5)
    ]
    ops.append(gce.insert(gce.instance("b-0", labels={"mlcloud-cluster": "b"})))
    for op in ops:
        gce.wait(op)
    gce_env.fake.clear_calls()
    flt = 'labels.mlcloud-cluster = "a"'
    assert gce.names(flt=flt, page=2) == [f"a-{i}" for i in range(5)]
    pages = gce_env.fake.calls("GET", r"/instances$")
    assert len(pages) == 3 and pages[1].query["pageToken"] and pages[0].query["filter"] == flt
    both = '(labels.mlcloud-cluster = "a") AND (labels.mlcloud-owner = "me")'
    assert len(gce.names(flt=both)) == 5
    assert gce.names(flt='labels.mlcloud-cluster != "a"') == ["b-0"]
    assert gce.names(flt="labels.mlcloud-owner:*") == [f"a-{i}" for i in range(5)]
    assert gce.names(flt="name eq b-.*") == ["b-0"]
    from google.api_core.exceptions import BadRequest

    with pytest.raises(BadRequest, match="filter"):
        gce.names(flt="labels.x = (")


def test_aggregated_list_spans_zones(gce):
    zones = ["us-central1-a", "us-east1-b"]
    for i, z in enumerate(zones):
        gce.wait(gce.insert(gce.instance(f"vm-{i}", zone=z), zone=z), zone=z)
    req = gce.c.AggregatedListInstancesRequest(
        project=gce.project, filter='labels.mlcloud-cluster = "c-1"', max_results=1
    )
    found = {
        (scope, inst.name)
        for scope, scoped in gce.instances.aggregated_list(request=req)
        for inst in scoped.instances
    }
    assert found == {("zones/us-central1-a", "vm-0"), ("zones/us-east1-b", "vm-1")}


def test_repeated_request_id_returns_the_same_operation(gce, gce_env):
    rid = str(uuid.uuid4())
    first = gce.insert(gce.instance("vm-1"), request_id=rid)
    again = gce.insert(gce.instance("vm-1"), request_id=rid)  # a retry after a lost reply
    assert again.name == first.name
    gce.wait(again)
    assert [i["name"] for i in gce_env.fake.instances()] == ["vm-1"]
    assert [c.request_id for c in gce_env.fake.calls("POST", r"/instances$")] == [rid, rid]
    from google.api_core.exceptions import BadRequest, Conflict

    with pytest.raises(Conflict, match="already exists"):  # a new request for the same name
        gce.insert(gce.instance("vm-1"))
    with pytest.raises(BadRequest, match="requestId"):
        gce.insert(gce.instance("vm-2"), request_id="not-a-uuid")
    # GCE keeps a requestId (at least 60 min); after that it starts a new operation
    gce_env.fake.request_id_ttl = 0
    with pytest.raises(Conflict):
        gce.insert(gce.instance("vm-1"), request_id=rid)


def test_bulk_insert_names_and_properties(gce, gce_env):
    c = gce.c
    props = c.InstanceProperties(
        machine_type="n1-standard-8",
        labels={"mlcloud-cluster": "bulk"},
        disks=gce.instance("x").disks,
        network_interfaces=gce.instance("x").network_interfaces,
        guest_accelerators=[
            c.AcceleratorConfig(accelerator_type="nvidia-tesla-t4", accelerator_count=1)
        ],
        scheduling=c.Scheduling(
            provisioning_model="SPOT",
            instance_termination_action="DELETE",
            on_host_maintenance="TERMINATE",
            automatic_restart=False,
        ),
    )
    gce.wait(gce.insert(gce.instance("bulk-0002")))  # numbering continues after it
    body = c.BulkInsertInstanceResource(
        count=3,
        name_pattern="bulk-####",
        instance_properties=props,
        per_instance_properties={"bulk-head": c.BulkInsertInstanceResourcePerInstanceProperties()},
    )
    req = c.BulkInsertInstanceRequest(
        project=gce.project,
        zone=ZONE,
        bulk_insert_instance_resource_resource=body,
        request_id=str(uuid.uuid4()),
    )
    op = gce.wait(gce.instances.bulk_insert_unary(request=req))
    assert not op.error.errors and op.operation_type == "bulkInsert"
    status = op.instances_bulk_insert_operation_metadata.per_location_status[f"zones/{ZONE}"]
    assert (status.created_vm_count, status.target_vm_count) == (3, 3)
    assert gce.names(flt='labels.mlcloud-cluster = "bulk"') == [
        "bulk-0003",
        "bulk-0004",
        "bulk-head",
    ]
    vm = gce.instances.get(project=gce.project, zone=ZONE, instance="bulk-0003")
    assert vm.scheduling.provisioning_model == "SPOT"
    assert vm.scheduling.instance_termination_action == "DELETE"
    assert len(gce_env.fake.calls("POST", "bulkInsert")) == 1


def test_firewalls_insert_get_list_delete(gce, gce_env):
    c = gce.c
    rule = c.Firewall(
        name="mlcloud-c-1-ssh",
        direction="INGRESS",
        allowed=[c.Allowed(I_p_protocol="tcp", ports=["22"])],
        source_ranges=["198.51.100.7/32"],
        target_tags=["mlcloud-c-1"],
    )
    op = gce.firewalls.insert_unary(project=gce.project, firewall_resource=rule)
    op = gce.global_ops.wait(project=gce.project, operation=op.name)
    assert op.status == c.Operation.Status.DONE and not op.error.errors
    got = gce.firewalls.get(project=gce.project, firewall="mlcloud-c-1-ssh")
    assert list(got.source_ranges) == ["198.51.100.7/32"] and got.network.endswith(
        "/networks/default"
    )
    assert got.allowed[0].I_p_protocol == "tcp" and list(got.allowed[0].ports) == ["22"]
    # GCE's default for an ingress rule without sources: the whole world (what mlcloud must avoid)
    internal = c.Firewall(name="open", allowed=[c.Allowed(I_p_protocol="all")])
    gce.firewalls.insert_unary(project=gce.project, firewall_resource=internal)
    assert gce.firewalls.get(project=gce.project, firewall="open").source_ranges == ["0.0.0.0/0"]
    wider = c.Firewall(source_ranges=["198.51.100.7/32", "192.0.2.9/32"])
    op = gce.firewalls.patch_unary(
        project=gce.project, firewall="mlcloud-c-1-ssh", firewall_resource=wider
    )
    gce.global_ops.wait(project=gce.project, operation=op.name)
    got = gce.firewalls.get(project=gce.project, firewall="mlcloud-c-1-ssh")
    assert len(got.source_ranges) == 2 and list(got.target_tags) == ["mlcloud-c-1"]
    req = c.ListFirewallsRequest(project=gce.project, filter="name = mlcloud-*")
    assert [f.name for f in gce.firewalls.list(request=req)] == ["mlcloud-c-1-ssh"]
    for name in ("mlcloud-c-1-ssh", "open"):
        op = gce.firewalls.delete_unary(project=gce.project, firewall=name)
        gce.global_ops.wait(project=gce.project, operation=op.name)
    assert gce_env.fake.firewalls() == []


def test_images_from_family_and_zones(gce):
    image = gce.images.get_from_family(
        project="deeplearning-platform-release", family="pytorch-latest-gpu"
    )
    assert image.self_link.startswith(
        "https://www.googleapis.com/compute/v1/projects/deeplearning-platform-release/global/images/pytorch-latest-gpu-"
    )
    assert not image.deprecated.state  # the newest, not the deprecated older one
    from google.api_core.exceptions import NotFound

    with pytest.raises(NotFound):
        gce.images.get_from_family(project="deeplearning-platform-release", family="no-such")
    zone = gce.zones.get(project=gce.project, zone=ZONE)
    assert zone.status == "UP" and zone.region.endswith("/regions/us-central1")
    region = gce.regions.get(project=gce.project, region="us-central1")
    assert any(z.endswith(f"/zones/{ZONE}") for z in region.zones)
    names = {z.name for z in gce.zones.list(project=gce.project)}
    assert {"us-central1-a", "asia-northeast1-a"} <= names  # the catalog's zones are there


def test_invalid_requests_answer_400(gce):
    from google.api_core.exceptions import BadRequest

    bad = [
        gce.instance("vm-1", labels={"Mlcloud-Cluster": "x"}),  # label keys are lowercase
        gce.instance("Bad_Name"),
        gce.instance("vm-2", scheduling=gce.c.Scheduling(on_host_maintenance="MIGRATE")),
        gce.instance(  # GPUs built into the machine type cannot live-migrate either
            "vm-4",
            machine_type=f"zones/{ZONE}/machineTypes/a2-highgpu-1g",
            guest_accelerators=[],
            scheduling=gce.c.Scheduling(),
        ),
    ]
    for inst in bad:
        with pytest.raises(BadRequest):
            gce.insert(inst)
    small = gce.instance("vm-3")
    small.disks[0].initialize_params.disk_size_gb = 10  # smaller than the image
    with pytest.raises(BadRequest, match="image size"):
        gce.insert(small)


def test_credentials_token_grant_and_401(gce_env):
    """google-auth's JWT-bearer grant at the key file's token_uri; no credentials, a 401."""
    import google.auth
    import google.auth.transport.requests

    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/compute"])
    creds.refresh(google.auth.transport.requests.Request())
    assert creds.token.startswith("ya29.fake-")
    assert json.loads(gce_env.credentials.read_text())["token_uri"] == f"{gce_env.url}/token"
    url = f"{gce_env.url}/compute/v1/projects/{gce_env.project}/zones/{ZONE}/instances"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {creds.token}"})
    with urllib.request.urlopen(req) as r:  # noqa: S310 - loopback
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url)  # noqa: S310 - loopback
    assert err.value.code == 401
    assert json.loads(err.value.read())["error"]["status"] == "UNAUTHENTICATED"


def test_no_credentials_fails_on_loopback(monkeypatch):
    """With nothing configured, google.auth.default() fails without asking a metadata server
    or a resolver (the network guard would fail this test)."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises(DefaultCredentialsError):
        google.auth.default()
    # and in a fresh process, as the CLI meets it
    code = (
        "import google.auth\n"
        "try:\n google.auth.default()\n"
        "except Exception as e:\n print(type(e).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "DefaultCredentialsError", out.stderr


def test_operations_follow_time(gce, gce_env):
    gce_env.fake.slow(0.6)
    op = gce.insert(gce.instance("vm-1"))
    t0 = time.monotonic()
    waited = gce.zone_ops.wait(project=gce.project, zone=ZONE, operation=op.name)
    assert waited.status == gce.c.Operation.Status.DONE and time.monotonic() - t0 >= 0.4
    got = gce.zone_ops.get(project=gce.project, zone=ZONE, operation=op.name)
    assert got.status == gce.c.Operation.Status.DONE and got.progress == 100


def test_exhausted_zone_ends_the_operation_with_the_error_and_no_vm(gce, gce_env):
    gce_env.fake.exhaust(ZONE)
    op = gce.insert(gce.instance("vm-1"))
    assert op.status != gce.c.Operation.Status.DONE  # the call itself succeeds, as on GCE
    done = gce.wait(op)
    assert [e.code for e in done.error.errors] == ["ZONE_RESOURCE_POOL_EXHAUSTED"]
    assert f"projects/{gce.project}/zones/{ZONE}" in done.error.errors[0].message
    assert done.http_error_status_code == 503
    assert gce_env.fake.instances() == []
    other = "us-central1-b"  # the next zone has room
    assert not gce.wait(
        gce.insert(gce.instance("vm-1", zone=other), zone=other), other
    ).error.errors
    # a repeated requestId replays the failed operation, even once the zone has room again
    rid = str(uuid.uuid4())
    failed = gce.wait(gce.insert(gce.instance("vm-9"), request_id=rid))
    gce_env.fake.set_capacity(ZONE, None)
    again = gce.wait(gce.insert(gce.instance("vm-9"), request_id=rid))
    assert again.name == failed.name and again.error.errors[0].code == failed.error.errors[0].code
    gce_env.fake.exhaust(other, details=True)
    done = gce.wait(gce.insert(gce.instance("vm-2", zone=other), zone=other), other)
    assert done.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"
    assert "nvidia-tesla-t4" in done.error.errors[0].message


def test_bulk_insert_capacity_and_min_count(gce, gce_env):
    c = gce.c
    template = gce.instance("x")
    props = c.InstanceProperties(
        machine_type="n1-standard-8",
        disks=template.disks,
        network_interfaces=template.network_interfaces,
    )

    def bulk(count, min_count):
        body = c.BulkInsertInstanceResource(
            count=count, min_count=min_count, name_pattern="n-##", instance_properties=props
        )
        req = c.BulkInsertInstanceRequest(
            project=gce.project, zone=ZONE, bulk_insert_instance_resource_resource=body
        )
        return gce.wait(gce.instances.bulk_insert_unary(request=req))

    gce_env.fake.set_capacity(ZONE, 3)
    op = bulk(4, 4)  # minCount not met: nothing is made
    assert op.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED"
    assert gce_env.fake.instances() == []
    op = bulk(4, 2)  # minCount met: what fits
    assert not op.error.errors
    status = op.instances_bulk_insert_operation_metadata.per_location_status[f"zones/{ZONE}"]
    assert (status.created_vm_count, status.failed_to_create_vm_count) == (3, 1)
    assert gce.names() == ["n-01", "n-02", "n-03"]


def test_quota_in_the_operation_or_on_the_call(gce, gce_env):
    from google.api_core.exceptions import Forbidden

    gce_env.fake.quota("us-central1", limit=1, metric="NVIDIA_T4_GPUS")
    assert not gce.wait(gce.insert(gce.instance("vm-1"))).error.errors
    done = gce.wait(gce.insert(gce.instance("vm-2")))
    err = done.error.errors[0]
    assert err.code == "QUOTA_EXCEEDED" and "NVIDIA_T4_GPUS" in err.message
    assert err.error_details[0].quota_info.dimensions["region"] == "us-central1"
    assert done.http_error_status_code == 403
    assert [i["name"] for i in gce_env.fake.instances()] == ["vm-1"]
    gce_env.fake.quota("us-central1", limit=1, sync=True)
    with pytest.raises(Forbidden, match="Quota 'NVIDIA_T4_GPUS' exceeded") as e:
        gce.insert(gce.instance("vm-3", zone="us-central1-b"), zone="us-central1-b")
    assert e.value.errors[0]["reason"] == "quotaExceeded"


def test_rate_limit_answers_429_then_recovers(gce, gce_env):
    from google.api_core.exceptions import TooManyRequests

    gce_env.fake.rate_limit(2, method="POST", path=r"/instances$")
    rid = str(uuid.uuid4())
    for _ in range(2):
        with pytest.raises(TooManyRequests, match="Rate Limit Exceeded") as e:
            gce.insert(gce.instance("vm-1"), request_id=rid)
        assert e.value.errors[0]["reason"] == "rateLimitExceeded"
    assert gce.names() == []  # a GET is not throttled by this rule
    gce.wait(gce.insert(gce.instance("vm-1"), request_id=rid))
    statuses = [(c.status, c.request_id) for c in gce_env.fake.calls("POST", r"/instances$")]
    assert statuses == [(429, rid), (429, rid), (200, rid)]


def test_unsupported_type_in_zone_and_spot_preemption(gce, gce_env):
    from google.api_core.exceptions import BadRequest, NotFound

    gce_env.fake.unsupported(ZONE, "nvidia-tesla-t4")
    with pytest.raises(NotFound, match=f"zones/{ZONE}/acceleratorTypes/nvidia-tesla-t4"):
        gce.insert(gce.instance("vm-1"))
    gce_env.fake.unsupported(ZONE, "n1-standard-8")
    with pytest.raises(BadRequest, match=f"does not exist in zone '{ZONE}'"):
        gce.insert(gce.instance("vm-1", guest_accelerators=[]))
    assert gce_env.fake.instances() == []
    zone = "us-central1-b"
    spot = gce.c.Scheduling(
        provisioning_model="SPOT",
        instance_termination_action="DELETE",
        on_host_maintenance="TERMINATE",
        automatic_restart=False,
    )
    gce.wait(gce.insert(gce.instance("spot-1", zone=zone, scheduling=spot), zone=zone), zone)
    stop = gce.c.Scheduling(provisioning_model="SPOT", on_host_maintenance="TERMINATE")
    gce.wait(gce.insert(gce.instance("spot-2", zone=zone, scheduling=stop), zone=zone), zone)
    gce_env.fake.preempt(zone, "spot-1")
    gce_env.fake.preempt(zone, "spot-2")
    assert [(i["name"], i["status"]) for i in gce_env.fake.instances()] == [
        ("spot-2", "TERMINATED")
    ]


def test_an_operation_ends_throttled_and_a_vm_is_reclaimed_while_starting(gce, gce_env):
    """Both as GCE shows them: the call succeeds; the operation ends DONE with
    RATE_LIMIT_EXCEEDED (429) and nothing made; a VM reclaimed while STAGING never runs,
    its insert DONE without error."""
    fake = gce_env.fake
    fake.rate_limit_operations(1, zone=ZONE)
    op = gce.wait(gce.insert(gce.instance("vm-1")))
    assert [e.code for e in op.error.errors] == ["RATE_LIMIT_EXCEEDED"]
    assert op.http_error_status_code == 429 and gce.names() == []
    assert not gce.wait(gce.insert(gce.instance("vm-1"))).error.errors  # the next one: made
    spot = gce.c.Scheduling(
        provisioning_model="SPOT",
        instance_termination_action="DELETE",
        on_host_maintenance="TERMINATE",
        automatic_restart=False,
    )
    fake.reclaim_while_starting(ZONE, vms=2)
    op = gce.wait(gce.insert(gce.instance("spot-1", scheduling=spot)))
    assert not op.error.errors
    gce.wait(gce.insert(gce.instance("vm-2")))  # termination action STOP, the default
    fake.advance_clock(1)
    assert [(i["name"], i["status"]) for i in fake.instances()] == [
        ("vm-1", "RUNNING"),
        ("vm-2", "TERMINATED"),
    ]


def test_max_run_duration_needs_a_termination_action_and_ends_the_vm(gce, gce_env):
    from google.api_core.exceptions import BadRequest

    sched = gce.c.Scheduling(
        on_host_maintenance="TERMINATE", max_run_duration=gce.c.Duration(seconds=3600)
    )
    with pytest.raises(BadRequest, match="instanceTerminationAction"):
        gce.insert(gce.instance("vm-1", scheduling=sched))
    sched.instance_termination_action = "DELETE"
    gce.wait(gce.insert(gce.instance("vm-1", scheduling=sched)))
    vm = gce.instances.get(project=gce.project, zone=ZONE, instance="vm-1")
    assert vm.scheduling.max_run_duration.seconds == 3600
    gce_env.fake.advance_clock(3000)
    assert gce.names() == ["vm-1"]
    gce_env.fake.advance_clock(600)  # the cloud ends it, whatever runs on it
    assert gce.names() == []


def test_fake_as_a_process_with_remote_control(gce_fake_process):
    """The CLI-as-subprocess setup: the fake in its own process, faults over /_fake/."""
    env = gce_fake_process
    gce = Clients(env)
    env.fake.exhaust(ZONE)
    assert gce.wait(gce.insert(gce.instance("vm-1"))).error.errors[0].code.startswith("ZONE_")
    gce.wait(gce.insert(gce.instance("vm-1", zone="us-east1-b"), zone="us-east1-b"), "us-east1-b")
    assert [i["name"] for i in env.fake.instances()] == ["vm-1"]
    inserts = env.fake.calls("POST", r"/instances$")
    assert len(inserts) == 2 and all(c.request_id for c in inserts)
    assert not env.fake.is_empty()
    env.fake.reset()
    assert env.fake.is_empty() and env.fake.calls() == []


def test_billing_catalog_skus_rebuild_the_shipped_prices(gce_env):
    """The Cloud Billing Catalog API at the fake's address: Compute Engine SKUs, paged, with
    on-demand, Spot and commitment rates; the smallest T4 shape adds up to the catalog's."""
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    session = AuthorizedSession(creds)
    url = f"{gce_env.url}/v1/services/6F81-5844-456A/skus"
    params, skus, pages = {"currencyCode": "USD", "pageSize": 400}, [], 0
    while True:
        page = session.get(url, params=params, timeout=10).json()
        skus += page["skus"]
        pages += 1
        if not page["nextPageToken"]:
            break
        params["pageToken"] = page["nextPageToken"]
    session.close()
    assert pages > 1

    def rate(prefix: str, usage: str = "OnDemand") -> float:
        (sku,) = [
            s
            for s in skus
            if s["description"].startswith(prefix + " running in ")
            and s["category"]["usageType"] == usage
            and "us-central1" in s["serviceRegions"]
        ]
        price = sku["pricingInfo"][0]["pricingExpression"]["tieredRates"][-1]["unitPrice"]
        return int(price["units"]) + price["nanos"] / 1e9

    core, ram = rate("N1 Predefined Instance Core"), rate("N1 Predefined Instance Ram")
    t4 = rate("Nvidia Tesla T4 GPU")
    assert core == pytest.approx(0.031611) and ram == pytest.approx(0.004237)
    assert 8 * core + 30 * ram + t4 == pytest.approx(0.729998)  # n1-standard-8+T4:1 shipped
    assert rate("Spot Preemptible Nvidia Tesla T4 GPU", "Preemptible") < t4
    assert any(s["category"]["usageType"] == "Commit1Yr" for s in skus)


def test_injected_call_failures_and_revoked_credentials(gce, gce_env):
    from google.api_core.exceptions import Forbidden, Unauthorized

    fake = gce_env.fake
    fake.fail_calls(1, 503, "backendError", method="GET")
    assert gce.names() == []  # the client retries a GET on 503 by itself
    assert [c.status for c in fake.calls("GET")] == [503, 200]
    fake.fail_calls(1, 403, "forbidden", method="POST")
    with pytest.raises(Forbidden, match="permission"):
        gce.insert(gce.instance("vm-1"))
    fake.revoke_credentials()
    with pytest.raises(Unauthorized):  # an HTTP 401 is Unauthorized, not its Unauthenticated
        gce.names()


LABEL_VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", max_size=63)


@settings(max_examples=60, deadline=None)
@given(LABEL_VALUE, LABEL_VALUE)
def test_label_filters_match_exactly_the_valued_label(value, other):
    """The fake's filter as the provider's label filters use it: any valid value, quoted."""
    from fakes.gce_filter import compile_filter

    def vm(v):
        return {"name": "x", "labels": {"mlcloud-cluster": v}}

    match = compile_filter(f'labels.mlcloud-cluster = "{value}"')
    assert match(vm(value)) and match(vm(other)) == (value == other)
    assert compile_filter("labels.mlcloud-cluster:*")(vm(value))
    assert not compile_filter("labels.mlcloud-owner:*")(vm(value))


def test_a_body_the_fake_cannot_read_is_a_500_not_a_hang_up(gce_env):
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    creds, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/compute"])
    session = AuthorizedSession(creds)
    url = f"{gce_env.url}/compute/v1/projects/{gce_env.project}/zones/{ZONE}/instances"
    machine = f"zones/{ZONE}/machineTypes/n1-standard-8"
    body = {"name": "vm-1", "machineType": machine, "disks": "not-a-list"}
    r = session.post(url, json=body, timeout=10)
    session.close()
    assert r.status_code == 500 and "AttributeError" in r.json()["error"]["message"]


def test_stop_and_start_keep_the_disk_and_change_the_address(gce, gce_env):
    fake = gce_env.fake
    gce.wait(gce.insert(gce.instance("vm-1")))

    def vm():
        return gce.instances.get(project=gce.project, zone=ZONE, instance="vm-1")

    first = vm().network_interfaces[0]
    gce.wait(gce.instances.stop_unary(project=gce.project, zone=ZONE, instance="vm-1"))
    stopped = vm()
    assert (
        stopped.status == "TERMINATED"
        and not stopped.network_interfaces[0].access_configs[0].nat_i_p
    )
    fake.exhaust(ZONE)  # a stopped GPU VM may find no room to start again
    op = gce.wait(gce.instances.start_unary(project=gce.project, zone=ZONE, instance="vm-1"))
    assert op.error.errors[0].code == "ZONE_RESOURCE_POOL_EXHAUSTED" and vm().status == "TERMINATED"
    fake.set_capacity(ZONE, None)
    gce.wait(gce.instances.start_unary(project=gce.project, zone=ZONE, instance="vm-1"))
    again = vm()
    assert (
        again.status == "RUNNING" and again.network_interfaces[0].network_i_p == first.network_i_p
    )
    assert again.network_interfaces[0].access_configs[0].nat_i_p  # a new ephemeral address
