"""What the GCE provider sends, checked without any API: labels, names, machine types, Spot and
budget scheduling, firewall rules, error classification; and the catalog's GCE offers."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli
from hypothesis import example, given
from hypothesis import strategies as st
from mlcloud.providers.aws import api as aws
from mlcloud.providers.gce import rules

from mlcloud.spec import catalog, plan
from mlcloud.spec.task import GpuSpec, Resources, TaskSpec, check_cluster_name

LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
GCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
cluster_names = st.from_regex(r"[a-z][a-z0-9-]{0,39}", fullmatch=True).filter(
    lambda n: not n.endswith("-")
)


@given(cluster_names, st.binary(min_size=4, max_size=4), st.text(min_size=1, max_size=80))
@example("a" * 40, b"\0" * 4, "Home ID")  # the longest name
def test_labels_and_names_are_valid_for_any_cluster(name, suffix, home):
    check_cluster_name(name)
    uid = f"{name}-{suffix.hex()}"  # as lifecycle.up makes it
    for value in rules.labels(uid, name, home).values():
        assert LABEL_VALUE.fullmatch(value), value
    assert rules.labels(uid, name, home)["mlcloud-cluster"] == uid  # uids are valid as they are
    for n in (rules.instance_name(uid, 9999), rules.tag(uid), *rules.firewall_names(uid)):
        assert GCE_NAME.fullmatch(n) and len(n) <= 63, n


@given(st.text(max_size=100), st.text(max_size=100))
def test_two_owners_never_share_a_label(a, b):
    if a != b:
        assert rules.label_value(a) != rules.label_value(b)


def test_n1_rows_split_at_plus_into_machine_and_accelerators():
    assert rules.split_type("n1-standard-16+T4:4") == ("n1-standard-16", [("nvidia-tesla-t4", 4)])
    assert rules.split_type("n1-standard-8+V100:1") == ("n1-standard-8", [("nvidia-tesla-v100", 1)])
    assert rules.split_type("a2-highgpu-8g") == ("a2-highgpu-8g", [])  # GPUs built in


def test_gpu_vms_terminate_on_maintenance_and_spot_deletes():
    props = rules.instance_properties(
        instance_type="n1-standard-8+T4:1",
        image="projects/deeplearning-platform-release/global/images/x",
        disk_gb=None,
        labels=rules.labels("c-1", "c", "home"),
        tag=rules.tag("c-1"),
        user="alice",
        public_key="ssh-ed25519 AAAA",
        spot=True,
        max_run_s=None,
    )
    assert props["machine_type"] == "n1-standard-8"
    assert props["guest_accelerators"] == [
        {"accelerator_type": "nvidia-tesla-t4", "accelerator_count": 1}
    ]
    assert props["scheduling"] == {
        "on_host_maintenance": "TERMINATE",
        "provisioning_model": "SPOT",
        "automatic_restart": False,
        "instance_termination_action": "DELETE",
    }
    meta = {i["key"]: i["value"] for i in props["metadata"]["items"]}
    assert meta["ssh-keys"] == "alice:ssh-ed25519 AAAA alice"
    assert meta["install-nvidia-driver"] == "True"
    disk = props["disks"][0]["initialize_params"]
    assert disk["disk_size_gb"] == rules.DISK_GB and disk["source_image"].endswith("/x")
    assert rules.scheduling("a3-highgpu-8g", False, None) == {"on_host_maintenance": "TERMINATE"}
    assert rules.scheduling("e2-standard-4", False, None) == {}


def test_max_run_duration_from_the_budget_deadline():
    assert rules.max_run_seconds(None, 1000.0) is None
    assert rules.max_run_seconds(1000.0 + 3600, 1000.0) == 3600
    assert rules.max_run_seconds(1001.0, 1000.0) == 30  # GCE's least
    assert rules.max_run_seconds(1e12, 0.0) == 120 * 86400  # and most
    s = rules.scheduling("e2-standard-4", False, 3600)
    assert s == {"max_run_duration": {"seconds": 3600}, "instance_termination_action": "DELETE"}


def test_firewall_opens_ssh_to_the_caller_only_and_all_within_the_tag():
    ssh, internal = rules.firewalls("c-1", "home", ["203.0.113.7/32"])
    assert ssh["source_ranges"] == ["203.0.113.7/32"] and ssh["allowed"][0]["ports"] == ["22"]
    assert internal["source_tags"] == internal["target_tags"] == [rules.tag("c-1")]
    assert "source_ranges" not in internal
    assert all("0.0.0.0/0" not in f.get("source_ranges", []) for f in (ssh, internal))
    assert rules.firewall_owner(ssh["description"]) == ("c-1", "home")
    assert rules.firewall_owner("someone else's rule") is None


def test_request_ids_are_uuids_fixed_by_the_attempt():
    a = rules.request_id("c-1", "us-central1-a:mlcloud-c-1-0")
    assert a == rules.request_id("c-1", "us-central1-a:mlcloud-c-1-0")
    assert a != rules.request_id("c-1", "us-central1-b:mlcloud-c-1-0")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a)


def test_every_gce_instance_state_maps_onto_mlclouds():
    from google.cloud import compute_v1
    from mlcloud.providers.base import GONE
    from mlcloud.providers.gce.provider import STATUS

    assert set(STATUS) == set(compute_v1.Instance.Status.__members__) - {"UNDEFINED_STATUS"}
    assert STATUS["RUNNING"] == "running" and STATUS["TERMINATED"] in GONE  # powered off


@pytest.mark.parametrize(
    "code, message, kind",
    [
        ("ZONE_RESOURCE_POOL_EXHAUSTED", "The zone does not have enough resources", "capacity"),
        ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "...", "capacity"),
        (
            "UNSUPPORTED_OPERATION",
            "Machine type a2-highgpu-1g is not supported in zone",
            "capacity",
        ),
        (
            "notFound",
            "The resource 'projects/p/zones/us-east1-c/acceleratorTypes/nvidia-l4' was not found",
            "capacity",
        ),
        ("QUOTA_EXCEEDED", "Quota 'NVIDIA_T4_GPUS' exceeded. Limit: 0.0", "quota"),
        ("rateLimitExceeded", "Rate Limit Exceeded", "rate"),
        ("RESOURCE_ALREADY_EXISTS", "The resource already exists", "exists"),
        ("RESOURCE_NOT_FOUND", "The resource was not found", None),
    ],
)
def test_operation_errors_are_classified(code, message, kind):
    assert rules.classify(code, message) == kind


def test_gpu_asks_resolve_across_aws_and_gce(monkeypatch, tmp_path):
    key = tmp_path / "key.json"
    key.write_text("{}")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # both clouds usable here
    ask = TaskSpec(resources=Resources(gpus=GpuSpec("A100", 8)))
    spec, p = plan.make(ask, default_region=lambda _: None)
    assert (p.provider, p.instance_type) == ("gce", "a2-highgpu-8g") and spec.provider == "gce"
    assert p.fallback_regions  # the same type elsewhere, for failover
    t4 = catalog.find(catalog.load(), GpuSpec("T4", 4), provider="gce")[0]
    assert t4.instance_type == "n1-standard-16+T4:4" and t4.zones


def test_a_gpu_ask_goes_to_the_clouds_this_machine_has_credentials_for(monkeypatch, tmp_path):
    """GCE is cheaper for A100:8, but a user with only AWS credentials gets AWS; with none
    at all, the cheapest cloud (and its credentials error at `up`)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(home / "gcloud"))
    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    for var in aws.CREDENTIAL_ENVS:
        monkeypatch.delenv(var, raising=False)
    ask = TaskSpec(resources=Resources(gpus=GpuSpec("A100", 8)))
    assert plan.make(ask, default_region=lambda _: None)[1].provider == "gce"
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text("[default]\n")
    assert plan.make(ask, default_region=lambda _: None)[1].provider == "aws"
    (home / ".aws" / "credentials").unlink()
    (home / "gcloud").mkdir()
    (home / "gcloud" / "application_default_credentials.json").write_text("{}")
    assert plan.make(ask, default_region=lambda _: None)[1].provider == "gce"


def test_offers_lists_both_clouds():
    r = run_cli("offers", "A100:8", "--json")
    assert r.returncode == 0, r.stderr
    assert {"aws", "gce"} <= {o["provider"] for o in json.loads(r.stdout)["offers"]}
