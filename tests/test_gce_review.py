"""The GCE provider against answers a documented-correct Compute API may give that our fake
did not give by default (waits that return at once, 5xx to retry, VMs made as a bulkInsert
runs, a disabled API, labelled clones), and against what users type (unknown or mismatched
zones and regions, image URLs)."""

from __future__ import annotations

import pytest
from mlcloud.providers.base import AuthError
from mlcloud.providers.gce import api, rules
from mlcloud.providers.gce.provider import GceProvider, Settings
from test_gce_provider import REF, made, request

from mlcloud.errors import UsageError


def test_a_wait_answered_at_once_not_done_is_not_a_busy_loop(gce_env, mlcloud_home):
    """operations.wait "might return after zero seconds" (Google's docs): the provider pauses
    between such answers instead of calling again at once, dozens of times a second."""
    fake, p = gce_env.fake, GceProvider()
    fake.wait_cap, fake.op_seconds = 0.0, 0.6  # every wait answers at once, RUNNING
    made(p, request(count=1))  # two firewall inserts and one bulkInsert: three operations
    waits = fake.calls("POST", r"/wait$")
    assert 3 <= len(waits) <= 15, len(waits)


def test_an_unknown_region_is_bad_input_not_no_capacity(gce_env, mlcloud_home):
    p = GceProvider()
    req = request(zone=None, region="nowhere1", instance_type="n1-standard-4")
    with pytest.raises(UsageError, match="no GCE region 'nowhere1'"):
        p.placements(req)
    ok = p.placements(request(zone=None, instance_type="n1-standard-4"))
    assert ok and all(r == "us-central1" and z.startswith("us-central1-") for r, z in ok)


def test_an_unknown_zone_is_bad_input_before_anything_is_made(gce_env, mlcloud_home):
    fake, p = gce_env.fake, GceProvider()
    with pytest.raises(UsageError, match="no GCE zone 'us-central1-q'") as e:
        p.placements(request(zone="us-central1-q"))
    assert e.value.exit_code == 2 and fake.is_empty()
    assert p.placements(request()) == [("us-central1", "us-central1-a")]


def test_a_5xx_google_asks_to_retry_is_retried_with_the_same_request_id(
    gce_env, mlcloud_home, monkeypatch
):
    """503 backendError: "retry using exponential backoff" (Google's docs); the client
    retries only GETs on its own, so a bulkInsert or an operation wait failed `up`."""
    monkeypatch.setattr(api, "BACKOFF_S", 0.01)
    fake, p = gce_env.fake, GceProvider()
    req = p.prepare(REF, request()).request
    fake.fail_calls(1, 503, method="POST", path=r"/bulkInsert$")
    fake.fail_calls(1, 500, "internalError", method="POST", path=r"/wait$")
    assert len(p.create(REF, req, 2)) == 2
    inserts = fake.calls("POST", r"/bulkInsert$")
    assert [c.status for c in inserts] == [503, 200] and len({c.request_id for c in inserts}) == 1


@pytest.mark.parametrize(
    "image",
    [
        "https://www.googleapis.com/compute/v1/projects/my-proj/global/images/family/my-fam",
        "projects/my-proj/global/images/family/my-fam",
    ],
)
def test_an_image_family_given_as_a_full_url_is_looked_up(gce_env, mlcloud_home, image):
    """The console and `gcloud --uri` give full URLs; one of a family used to reach the
    client as a project named "https://..." (a ValueError traceback)."""
    fake, p = gce_env.fake, GceProvider()
    fake.add_image("my-proj", "my-img-v2", family="my-fam", disk_gb=50)
    req = p.prepare(REF, request(count=1, image=image)).request
    assert req.image == "projects/my-proj/global/images/my-img-v2"


def test_an_image_that_names_nothing_is_one_line_of_bad_input(gce_env, mlcloud_home):
    with pytest.raises(UsageError, match="image 'my-proj/my-fam'"):
        GceProvider().prepare(REF, request(image="my-proj/my-fam"))


def test_down_after_up_was_killed_mid_bulk_insert_waits_for_its_vms(
    gce_env, mlcloud_home, monkeypatch
):
    """GCE makes a bulkInsert's VMs as the operation runs: `down` right after an `up` killed
    while it waited lists none, yet they come. It waits for the operation, then deletes."""
    fake, p = gce_env.fake, GceProvider()
    req = p.prepare(REF, request()).request
    # long enough that a loaded machine still lists nothing before the VMs come
    fake.late_bulk_instances, fake.op_seconds = True, 3.0

    def killed(self, op, zone, region):
        if zone:  # the bulkInsert's wait: the process dies here (no finally runs on SIGKILL)
            raise SystemExit(137)
        return real_wait(self, op, zone, region)

    real_wait = api.Api.wait
    monkeypatch.setattr(api.Api, "wait", killed)
    with pytest.raises(SystemExit):
        p.create(REF, req, 2)
    monkeypatch.setattr(api.Api, "wait", real_wait)
    fake.op_seconds = 0.1  # the bulkInsert still takes its 3 s
    later = GceProvider()  # `down` in a new process
    assert later.list(REF) == []  # nothing listed yet
    later.cleanup(REF)
    assert fake.is_empty()
    fake.advance_clock(5)
    assert fake.is_empty(), fake.instances()


def test_the_same_vm_names_made_again_are_a_new_request(gce_env, mlcloud_home):
    """A replaced node gets its old name back: the same attempt's request id would get GCE's
    old (done) operation for an hour, and no VM."""
    fake, p = gce_env.fake, GceProvider()
    for _ in range(2):
        _, nodes = made(p, request())
        assert len(fake.instances()) == len(nodes) == 2
        p.terminate(REF, nodes)
    assert len({c.request_id for c in fake.calls("POST", r"/bulkInsert$")}) == 2


def test_a_zone_outside_the_region_is_bad_input(gce_env, mlcloud_home):
    """VMs made in us-central1-a for a cluster of region us-east1 were listed (and so
    deleted by `down`) nowhere: they ran on, unseen."""
    p = GceProvider()
    with pytest.raises(UsageError, match="zone us-central1-a is not in region us-east1"):
        p.check(request(region="us-east1", zone="us-central1-a"))
    assert gce_env.fake.is_empty()


def test_a_project_without_the_compute_api_says_to_enable_it(gce_env, mlcloud_home):
    """403 accessNotConfigured is no missing role: the fix is enabling the API."""
    gce_env.fake.fail_calls(
        1,
        403,
        "accessNotConfigured",
        message="Compute Engine API has not been used in project 123 before or it is "
        "disabled. Enable it by visiting https://console.developers.google.com/apis/api/"
        "compute.googleapis.com/overview?project=123 then retry.",
    )
    with pytest.raises(AuthError, match="gcloud services enable compute.googleapis.com"):
        GceProvider().placements(request(zone=None, instance_type="n1-standard-4"))


def test_a_labelled_vm_of_another_name_does_not_crash_listing(gce_env, mlcloud_home):
    """The console's "create similar" copies a VM's labels: a clone its user named is a VM of
    the cluster to list (and delete on `down`), not a ValueError traceback."""
    p, zone = GceProvider(), "us-central1-a"
    _, nodes = made(p, request(count=1))
    clone = rules.instance_properties(
        instance_type="n1-standard-4",
        image=f"projects/{rules.DLVM_PROJECT}/global/images/family/{rules.DLVM_FAMILY}",
        disk_gb=None,
        labels=rules.labels(REF.uid, REF.name, REF.owner),
        tag=rules.tag(REF.uid),
        user="me",
        public_key="ssh-ed25519 AAAA",
        spot=False,
        max_run_s=None,
    )
    clone["disks"][0]["initialize_params"]["disk_type"] = f"zones/{zone}/diskTypes/pd-balanced"
    clone.update(name="debug-clone", machine_type=f"zones/{zone}/machineTypes/n1-standard-4")
    a = p.api(Settings())
    op = a.call(
        "instances", "insert_unary", zone, project=a.project, zone=zone, instance_resource=clone
    )
    a.wait(op, zone, None)
    listed = p.list(REF)
    assert [n.node_id for n in listed] == [nodes[0].node_id, "debug-clone"]
    p.terminate(REF, listed)
    assert gce_env.fake.instances() == []


@pytest.mark.parametrize("kind", ["n1-standard-8+T4:x", "n1-standard-8+", "n1-standard-8+T4:0"])
def test_a_malformed_instance_type_is_one_line_before_anything_is_made(gce_env, mlcloud_home, kind):
    """`+T4:x` was a ValueError ("internal error, a bug in mlcloud") after the firewall
    rules were made; `+` or `:0` a 400 from the insert."""
    with pytest.raises(UsageError, match="instance type"):
        GceProvider().check(request(instance_type=kind))
    assert gce_env.fake.is_empty()


def test_a_key_file_that_is_not_json_is_one_plain_line(tmp_path, monkeypatch):
    key = tmp_path / "key.json"
    key.write_text("{")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    with pytest.raises(AuthError) as e:
        api.credentials()
    assert f"File {key} is not a valid json file." in str(e.value)
    assert "JSONDecodeError" not in str(e.value) and e.value.exit_code == 5
