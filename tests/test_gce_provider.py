"""The GCE provider through the real google-cloud-compute client against the fake Compute API
(tests/fakes/gce_server.py): what it creates, how it fails over and cleans up, and `gc`."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
from conftest import run_cli
from mlcloud.providers.base import (
    AuthError,
    CapacityError,
    ClusterRef,
    ProvisionRequest,
    QuotaError,
    SshOptions,
    StorageAccess,
)
from mlcloud.providers.gce import accounts, api, rules
from mlcloud.providers.gce.provider import GceProvider

from mlcloud import state
from mlcloud.provision import gc

REF = ClusterRef("demo", "demo-0123abcd", "home1", "us-central1")
T4 = "n1-standard-8+T4:1"


def request(**kw) -> ProvisionRequest:
    base = ProvisionRequest(
        count=2,
        instance_type=T4,
        region="us-central1",
        zone="us-central1-a",
        ssh=SshOptions(allowed_cidrs=("127.0.0.1/32",)),
    )
    return replace(base, **kw)


def made(p: GceProvider, req: ProvisionRequest, ref: ClusterRef = REF):
    prepared = p.prepare(ref, req).request
    return prepared, p.create(ref, prepared, req.count)


def test_create_list_delete_through_the_real_client(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    req, nodes = made(p, request())
    assert [n.node_id for n in nodes] == [rules.instance_name(REF.uid, k) for k in (0, 1)]
    assert p.list(REF) == nodes and all(n.status == "running" for n in nodes)
    vm = fake.instances()[0]
    assert vm["labels"] == rules.labels(REF.uid, REF.name, REF.owner)
    assert vm["tags"]["items"] == [rules.tag(REF.uid)]
    assert vm["machineType"].endswith("/machineTypes/n1-standard-8")
    assert vm["guestAccelerators"][0]["acceleratorType"].endswith("/nvidia-tesla-t4")
    assert vm["scheduling"]["onHostMaintenance"] == "TERMINATE"
    meta = {i["key"]: i["value"] for i in vm["metadata"]["items"]}
    assert meta["install-nvidia-driver"] == "True"
    assert meta["ssh-keys"].startswith("mlcloud:ssh-ed25519 ") and req.ssh.user == "mlcloud"
    assert "deeplearning-platform-release" in req.image  # the DLVM family, pinned
    rules_by_name = {f["name"]: f for f in fake.firewalls()}
    ssh, internal = (rules_by_name[n] for n in rules.firewall_names(REF.uid))
    assert ssh["sourceRanges"] == ["127.0.0.1/32"] and ssh["targetTags"] == [rules.tag(REF.uid)]
    assert internal["sourceTags"] == internal["targetTags"] == [rules.tag(REF.uid)]
    assert not any("0.0.0.0/0" in f.get("sourceRanges", []) for f in fake.firewalls())
    assert p.prepare(REF, request()).request == req  # idempotent: a resumed `up`
    assert len(fake.firewalls()) == 2
    # one bulkInsert for both, with a request id
    inserts = fake.calls("POST", r"/instances/bulkInsert$")
    assert len(inserts) == 1 and inserts[0].request_id
    p.terminate(REF, nodes)
    assert p.list(REF) == []
    p.cleanup(REF)
    p.cleanup(REF)  # idempotent
    assert fake.is_empty()


def test_a_vm_carries_its_number_never_given_again(gce_env, mlcloud_home):
    """VMs are named, and their roots numbered, from the engine's first number: a node made
    after node 1 was deleted is node 2, not node 1 again."""
    p = GceProvider()
    _, nodes = made(p, request(first_number=0))
    assert [n.root for n in nodes] == [f"~/.mlcloud/{REF.uid}/node-{k}" for k in (0, 1)]
    p.terminate(REF, nodes[1:])
    _, (later,) = made(p, request(count=1, first_number=2))
    assert later.node_id == rules.instance_name(REF.uid, 2) and later.root.endswith("/node-2")
    assert rules.directory(REF.uid, "a-clone-of-it") == "a-clone-of-it"
    p.terminate(REF, [nodes[0], later])
    p.cleanup(REF)


def test_image_family_of_the_users_and_disk_size(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    fake.add_image("my-proj", "my-img-v2", family="my-fam", disk_gb=50)
    image = "projects/my-proj/global/images/family/my-fam"
    req, _ = made(p, request(count=1, image=image, disk_gb=300))
    assert req.image == "projects/my-proj/global/images/my-img-v2"  # pinned for a resumed up
    disk = fake.instances()[0]["disks"][0]
    assert disk["diskSizeGb"] == "300" and disk["autoDelete"] and disk["boot"]
    assert disk["licenses"] == [f"https://www.googleapis.com/compute/v1/{req.image}"]


def _ours(fake, bucket: str, member: str) -> list[dict]:
    return [b for b in fake.bucket_policy(bucket)["bindings"] if member in str(b["members"])]


def test_gs_storage_makes_a_cluster_account_granted_only_its_prefixes(gce_env, mlcloud_home):
    """The VMs run as the cluster's own service account; a token for it (what the metadata
    server gives the VM) reaches the checkpoint prefix read-write and the data prefix
    read-only, nothing else; `down` removes grants and account, and the user's credentials
    are nowhere in the VM."""
    fake, p = gce_env.fake, GceProvider()
    for b in ("ckpt-b", "data-b"):
        fake.create_bucket(b)
    fake.put_object("data-b", "shards/0", "input")
    fake.put_object("ckpt-b", "runs-other/x", "someone else's")
    storage = StorageAccess(
        write=("gs://ckpt-b/runs",), read=("gs://data-b/shards", "s3://data-s3/x")
    )
    prepared = p.prepare(REF, request(storage=storage))
    assert len(prepared.warnings) == 1 and "s3://data-s3/x" in prepared.warnings[0]
    assert p.prepare(REF, replace(request(storage=storage), zone="us-central1-b")).warnings == ()
    nodes = p.create(REF, prepared.request, 2)
    address = accounts.email(REF.uid, gce_env.project)
    for vm in fake.instances():
        assert vm["serviceAccounts"] == [{"email": address, "scopes": [rules.STORAGE_SCOPE]}]
    key = gce_env.credentials.read_text()
    assert json.loads(key)["private_key_id"] not in json.dumps(fake.instances())
    assert json.loads(key)["client_email"] not in json.dumps(fake.instances())
    assert len(fake.calls("POST", r"/serviceAccounts$")) == 1  # once, not per zone tried

    token = {"Authorization": f"Bearer {fake.token_for(address)}"}
    assert _gcs(gce_env, "POST", "ckpt-b", "runs/job/latest.json", token) == 200
    assert _gcs(gce_env, "GET", "ckpt-b", "runs/job/latest.json", token) == 200
    assert _gcs(gce_env, "DELETE", "ckpt-b", "runs/job/latest.json", token) == 204
    assert _gcs(gce_env, "GET", "ckpt-b", "runs-other/x", token) == 403  # a sibling prefix
    assert _gcs(gce_env, "POST", "ckpt-b", "elsewhere", token) == 403
    assert _gcs(gce_env, "GET", "data-b", "shards/0", token) == 200
    assert _gcs(gce_env, "POST", "data-b", "shards/1", token) == 403  # data is read-only
    assert _gcs(gce_env, "LIST", "data-b", "shards/", token) == 200
    assert _gcs(gce_env, "LIST", "data-b", "", token) == 403

    p.terminate(REF, nodes)
    p.cleanup(REF)
    assert fake.is_empty() and fake.service_accounts() == []
    assert not _ours(fake, "ckpt-b", address) and not _ours(fake, "data-b", address)
    p.cleanup(REF)  # again: nothing left, no error


def _gcs(env, method: str, bucket: str, name: str, headers: dict) -> int:
    import urllib.error
    import urllib.parse
    import urllib.request

    q = urllib.parse.quote(name, safe="")
    url, data = f"{env.url}/storage/v1/b/{bucket}/o/{q}?alt=media", None
    if method == "POST":
        url, data = f"{env.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={q}", b"x"
    if method == "LIST":
        method, url = "GET", f"{env.url}/storage/v1/b/{bucket}/o?prefix={q}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_resumed_up_finds_the_account_and_grants_once(gce_env, mlcloud_home):
    fake = gce_env.fake
    fake.create_bucket("ckpt-b")
    storage = StorageAccess(write=("gs://ckpt-b/runs",))
    made(GceProvider(), request(count=1, storage=storage))
    made(GceProvider(), request(count=1, storage=storage))  # a new process: 409, then on
    address = accounts.email(REF.uid, gce_env.project)
    assert len(fake.service_accounts()) == 1 and len(_ours(fake, "ckpt-b", address)) == 1
    assert all(vm["serviceAccounts"][0]["email"] == address for vm in fake.instances())


def test_policy_races_and_a_fresh_account_unknown_to_buckets_are_waited_out(
    gce_env, mlcloud_home, monkeypatch
):
    """Another writer's change between our read and write (412: read again), and IAM's
    eventual consistency (a fresh account that setIamPolicy does not know yet: asked again)."""
    fake = gce_env.fake
    fake.create_bucket("ckpt-b")
    monkeypatch.setattr(accounts, "FRESH_SLEEP_S", 0.1)
    fake.iam_lag(0.5)
    fake.fail_calls(1, 412, "conditionNotMet", method="PUT", path=r"/b/ckpt-b/iam$")
    start = time.monotonic()
    warned = GceProvider().prepare(REF, request(storage=StorageAccess(write=("gs://ckpt-b/r",))))
    assert warned.warnings == () and time.monotonic() - start >= 0.5
    address = accounts.email(REF.uid, gce_env.project)
    assert len(_ours(fake, "ckpt-b", address)) == 1
    puts = [c.status for c in fake.calls("PUT", r"/iam$")]
    assert puts[0] == 412 and 400 in puts and puts[-1] == 200


def test_no_gs_storage_no_account(gce_env, mlcloud_home):
    fake = gce_env.fake
    made(GceProvider(), request(count=1, storage=StorageAccess(write=("s3://ckpt/run",))))
    assert fake.instances()[0]["serviceAccounts"] == [] and fake.service_accounts() == []
    assert fake.calls(path="serviceAccounts|/storage/") == []


def test_a_bucket_not_the_users_is_a_warning_naming_what_to_grant(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    fake.create_bucket("ckpt-b")
    fake.fail_calls(1, 403, "forbidden", method="GET", path=r"/b/ckpt-b/iam$")
    storage = StorageAccess(write=("gs://ckpt-b/runs",), read=("gs://nobody-b/x",))
    warned = p.prepare(REF, request(storage=storage)).warnings
    address = accounts.email(REF.uid, gce_env.project)
    assert len(warned) == 2 and all("\n" not in w and address in w for w in warned)
    assert "gs://ckpt-b" in warned[0] and "HTTP 403" in warned[0]
    assert "roles/storage.objectAdmin" in warned[0]
    assert "gs://nobody-b" in warned[1] and "does not exist" in warned[1]


def test_credentials_that_may_not_read_iam_still_go_down_and_gc(gce_env, mlcloud_home):
    """They made no account: `down` and `gc` of a cluster without gs:// storage go on."""
    fake, p = gce_env.fake, GceProvider()
    _, nodes = made(p, request(count=1))
    fake.fail_calls(2, 403, "forbidden", path=r"/serviceAccounts")
    assert [r.kind for r in p.discover("us-central1")] == ["firewall", "firewall", "instance"]
    p.terminate(REF, nodes)
    p.cleanup(REF)
    assert fake.is_empty()


def test_no_right_to_make_accounts_is_one_line(gce_env, mlcloud_home):
    gce_env.fake.fail_calls(1, 403, "forbidden", path=r"/serviceAccounts$")
    with pytest.raises(AuthError) as info:
        GceProvider().prepare(REF, request(storage=StorageAccess(write=("gs://ckpt-b/r",))))
    assert "\n" not in str(info.value) and "iam.serviceAccounts.create" in str(info.value)


def test_the_specs_project_is_kept_for_later_commands(gce_env, mlcloud_home):
    fake = gce_env.fake
    _, nodes = made(GceProvider(), request(count=1, project="other-proj"))
    assert {vm["selfLink"].split("/projects/")[1].split("/")[0] for vm in fake.instances()} == {
        "other-proj"
    }
    later = GceProvider()  # `down` in another process, GOOGLE_CLOUD_PROJECT elsewhere
    assert later.list(REF) == nodes
    later.terminate(REF, nodes)
    later.cleanup(REF)
    assert fake.is_empty()


def test_a_resumed_up_from_a_new_address_widens_ssh_never_narrows(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    p.prepare(REF, request())
    p.prepare(REF, request(ssh=SshOptions(allowed_cidrs=("198.51.100.7/32",))))
    ssh = next(f for f in fake.firewalls() if f["name"] == rules.firewall_names(REF.uid)[0])
    assert sorted(ssh["sourceRanges"]) == ["127.0.0.1/32", "198.51.100.7/32"]
    p.cleanup(REF)


def test_list_reads_every_page(gce_env, mlcloud_home, monkeypatch):
    fake, p = gce_env.fake, GceProvider()
    _, nodes = made(p, request(count=3))
    monkeypatch.setattr(api, "PAGE_SIZE", 2)
    fake.clear_calls()
    assert p.list(REF) == nodes
    pages = fake.calls("GET", r"/aggregated/instances$")
    assert len(pages) == 2 and pages[1].query.get("pageToken")
    assert 'labels.mlcloud-cluster = "demo-0123abcd"' in pages[0].query["filter"]


def test_exhausted_zones_are_capacity_and_leave_nothing(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    fake.exhaust("us-central1-a")
    fake.exhaust("us-central1-b", details=True)
    for zone in ("us-central1-a", "us-central1-b"):
        with pytest.raises(CapacityError) as e:
            made(p, request(zone=zone))
        assert e.value.zone == zone and "ZONE_RESOURCE_POOL_EXHAUSTED" in str(e.value)
        assert fake.instances() == []
    _, nodes = made(p, request(zone="us-central1-c"))  # the engine's next zone
    assert {vm["zone"].rpartition("/")[2] for vm in fake.instances()} == {"us-central1-c"}
    p.terminate(REF, nodes)


def test_partial_capacity_is_all_or_nothing(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    fake.set_capacity("us-central1-a", 1)  # one VM fits, two were asked for
    with pytest.raises(CapacityError):
        made(p, request())
    assert fake.instances() == []


@pytest.mark.parametrize("kind", ["nvidia-tesla-t4", "n1-standard-8"])
def test_type_not_in_zone_is_capacity(gce_env, mlcloud_home, kind):
    fake, p = gce_env.fake, GceProvider()
    fake.unsupported("us-central1-a", kind)
    with pytest.raises(CapacityError) as e:
        made(p, request())
    assert e.value.zone == "us-central1-a" and fake.instances() == []


@pytest.mark.parametrize("sync", [False, True])
def test_quota_is_a_quota_error_for_the_region(gce_env, mlcloud_home, sync):
    fake, p = gce_env.fake, GceProvider()
    fake.quota("us-central1", limit=0, sync=sync)
    with pytest.raises(QuotaError) as e:
        made(p, request())
    assert e.value.scope == "us-central1" and "QUOTA" in str(e.value).upper()
    assert e.value.exit_code == 4 and fake.instances() == []


def test_throttled_insert_is_retried_with_the_same_request_id(gce_env, mlcloud_home, monkeypatch):
    monkeypatch.setattr(api, "BACKOFF_S", 0.01)
    fake, p = gce_env.fake, GceProvider()
    req = p.prepare(REF, request()).request
    fake.rate_limit(2, method="POST", path=r"/bulkInsert$")
    nodes = p.create(REF, req, 2)
    inserts = fake.calls("POST", r"/bulkInsert$")
    assert [c.status for c in inserts] == [429, 429, 200]
    ids = {c.request_id for c in inserts}
    assert len({c.request_id for c in inserts}) == 1 and len(nodes) == 2
    # an attempt GCE never answered, tried again (a resumed `up`), sends the same id: GCE
    # makes nothing twice; one it answered is not sent again (it would get the old answer)
    p.terminate(REF, nodes)
    fake.clear_calls()
    fake.rate_limit(api.RATE_RETRIES, method="POST", path=r"/bulkInsert$")
    with pytest.raises(api.RateLimited):
        p.create(REF, req, 2)
    assert len(p.create(REF, req, 2)) == 2
    again = fake.calls("POST", r"/bulkInsert$")
    assert len({c.request_id for c in again}) == 1 and again[0].request_id not in ids


def test_spot_deletes_on_termination_and_budget_sets_max_run_duration(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    _, nodes = made(p, request(count=1, spot=True, deadline=time.time() + 7200))
    s = fake.instances()[0]["scheduling"]
    assert s["provisioningModel"] == "SPOT" and s["instanceTerminationAction"] == "DELETE"
    assert 7100 <= int(s["maxRunDuration"]["seconds"]) <= 7200
    fake.preempt("us-central1-a", nodes[0].node_id)  # reclaimed: deleted, disk and all
    assert fake.instances() == [] and p.list(REF) == []


def test_gc_finds_and_deletes_this_homes_orphans(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    ref = replace(REF, owner=state_owner())
    fake.create_bucket("ckpt-b")
    made(p, request(storage=StorageAccess(write=("gs://ckpt-b/r",))), ref)
    store = state.open_store()
    found = gc.find(store, "gce", ["us-central1"]).found
    kinds = ["firewall", "firewall", "instance", "instance", "service-account"]
    assert sorted(r.kind for r in found) == kinds
    assert {r.cluster_uid for r in found} == {REF.uid} and all(r.owner == ref.owner for r in found)
    orphans = gc.decide(found, ref.owner, set(), 0, time.time())
    assert gc.delete(orphans) and fake.is_empty()
    assert fake.bucket_policy("ckpt-b")["bindings"][-1]["role"] == "roles/storage.legacyBucketOwner"


def test_doctor_rebuild_recovers_a_cluster_from_its_labels(gce_env, mlcloud_home):
    from mlcloud.provision import doctor

    p = GceProvider()
    ref = replace(REF, owner=state_owner())
    _, nodes = made(p, request(), ref)
    out = doctor.rebuild(["gce"], [])
    assert [(c.name, c.uid) for c in out.clusters] == [(REF.name, REF.uid)], out.notes
    rec = state.open_store().get_cluster(REF.name)
    assert rec.provider == "gce" and [n.node_id for n in rec.nodes] == [n.node_id for n in nodes]


def state_owner() -> str:
    from mlcloud.state import paths

    return paths.home_id()


def test_no_credentials_is_one_line(mlcloud_home):
    r = run_cli("up", "x", "--provider", "gce", "--instance-type", T4, "--region", "us-central1")
    assert r.returncode == 5 and r.stderr.count("\n") == 1, r.stderr
    assert "gcloud auth application-default login" in r.stderr


def test_a_zone_tried_again_after_it_failed_sends_a_new_request_id(gce_env, mlcloud_home):
    """GCE answers a repeated request id with the first operation, failure included, for an
    hour: once capacity is back, `up` again must get VMs, not the old error."""
    fake, p = gce_env.fake, GceProvider()
    fake.exhaust("us-central1-a")
    with pytest.raises(CapacityError):
        made(p, request())
    fake.set_capacity("us-central1-a", None)
    _, nodes = made(p, request())
    assert len(fake.instances()) == len(nodes) > 0
    p.terminate(REF, nodes)


def test_refused_credentials_are_an_auth_error(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    fake.revoke_credentials()
    with pytest.raises(AuthError) as e:
        p.discover("us-central1")
    assert e.value.exit_code == 5
