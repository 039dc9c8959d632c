"""Bucket credentials on AWS (moto in-process): with `storage:`, one IAM role and instance
profile per cluster whose policy names exactly the spec's S3 prefixes, attached at
RunInstances, tagged, deleted by `down` and found by `gc`; without it, no role at all."""

from __future__ import annotations

import json

import pytest
from mlcloud.providers.aws import iam as aws_iam
from mlcloud.providers.aws.provider import AwsProvider
from mlcloud.providers.base import ClusterRef, ProvisionRequest, SshOptions, StorageAccess
from moto import mock_aws

from mlcloud import state
from mlcloud.provision import gc, lifecycle
from mlcloud.report import PlainReporter
from mlcloud.spec.task import Resources, SshSpec, StorageSpec, TaskSpec

REF = ClusterRef("c1", "c1-0123abcd", "alice", "us-east-1")
STORAGE = StorageAccess(
    read=("s3://corpus-eu/shards/2026", "gs://other-cloud/x", "s3://whole-bucket"),
    write=("s3://my-ckpts/runs/llm",),
)


class Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


def refusal(code: str, message: str):
    """A before-call answer: the call fails with code and message and never reaches moto."""
    from botocore.awsrequest import AWSResponse

    parsed = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }
    return AWSResponse("https://ec2.us-east-1.amazonaws.com/", 400, {}, Raw(b"")), parsed


@pytest.fixture
def aws(aws_env):
    with mock_aws():
        p = AwsProvider()
        sent: list[dict] = []
        p.api.client("us-east-1").meta.events.register_first(
            "provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(params)
        )
        p.sent = sent
        yield p


def request(**kw) -> ProvisionRequest:
    base = dict(
        count=1,
        instance_type="g5.xlarge",
        region="us-east-1",
        ssh=SshOptions(allowed_cidrs=("203.0.113.4/32",)),
    )
    return ProvisionRequest(**{**base, **kw})


def iam(aws: AwsProvider):
    return aws.api.session.client("iam")


def test_role_policy_names_exactly_the_given_prefixes(aws):
    prepared = aws.prepare(REF, request(storage=STORAGE))
    assert [w for w in prepared.warnings if "gs://other-cloud/x" in w and "S3 only" in w]
    name = f"mlcloud-{REF.uid}"
    role = iam(aws).get_role(RoleName=name)["Role"]
    assert role["Path"] == "/mlcloud/"
    assert json.loads(json.dumps(role["AssumeRolePolicyDocument"]))["Statement"][0][
        "Principal"
    ] == {"Service": "ec2.amazonaws.com"}
    tags = {t["Key"]: t["Value"] for t in iam(aws).list_role_tags(RoleName=name)["Tags"]}
    assert tags["mlcloud-cluster"] == REF.uid and tags["mlcloud-owner"] == "alice"
    assert tags["mlcloud-region"] == "us-east-1"
    (policy_name,) = iam(aws).list_role_policies(RoleName=name)["PolicyNames"]
    doc = iam(aws).get_role_policy(RoleName=name, PolicyName=policy_name)["PolicyDocument"]
    grants = {
        (s["Resource"], tuple(s["Action"]) if isinstance(s["Action"], list) else s["Action"]): (
            s.get("Condition")
        )
        for s in doc["Statement"]
    }
    read, write = ("s3:GetObject",), tuple(aws_iam.WRITE_ACTIONS)
    assert grants == {
        ("arn:aws:s3:::my-ckpts", "s3:ListBucket"): {"StringLike": {"s3:prefix": ["runs/llm/*"]}},
        ("arn:aws:s3:::my-ckpts/runs/llm/*", write): None,
        ("arn:aws:s3:::corpus-eu", "s3:ListBucket"): {
            "StringLike": {"s3:prefix": ["shards/2026/*"]}
        },
        ("arn:aws:s3:::corpus-eu/shards/2026/*", read): None,
        ("arn:aws:s3:::whole-bucket", "s3:ListBucket"): None,
        ("arn:aws:s3:::whole-bucket/*", read): None,
    }
    assert all(s["Effect"] == "Allow" for s in doc["Statement"])
    assert "s3:DeleteObject" not in json.dumps([s for s in doc["Statement"] if "corpus" in str(s)])
    profile = iam(aws).get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]

    aws.create(REF, prepared.request, 1)
    assert aws.sent[0]["IamInstanceProfile"] == {"Name": name}
    # a resumed `up` finds them: no second role, no error, the profile keeps one role
    again = aws.prepare(REF, request(storage=STORAGE))
    profile = iam(aws).get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert len(profile["Roles"]) == 1
    assert not [w for w in again.warnings if "gs://" in w]  # said once, not per zone tried


def test_no_storage_no_role(aws):
    aws.create(REF, aws.prepare(REF, request()).request, 1)
    assert "IamInstanceProfile" not in aws.sent[0]
    assert iam(aws).list_roles()["Roles"] == []
    assert iam(aws).list_instance_profiles()["InstanceProfiles"] == []
    # only a gs:// bucket: nothing the instance profile could grant, so none is made
    prepared = aws.prepare(REF, request(storage=StorageAccess(write=("gs://b-eu/ckpt",))))
    assert prepared.warnings and iam(aws).list_roles()["Roles"] == []


def test_a_fresh_profile_refused_by_ec2_is_retried(aws, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    prepared = aws.prepare(REF, request(storage=STORAGE))
    refusals = []

    def not_yet(**_):
        if len(refusals) < 2:
            refusals.append(1)
            return refusal(
                "InvalidParameterValue",
                f"Value (mlcloud-{REF.uid}) for parameter iamInstanceProfile.name is invalid. "
                "Invalid IAM Instance Profile name",
            )
        return None

    aws.api.client("us-east-1").meta.events.register_first("before-call.ec2.RunInstances", not_yet)
    (node,) = aws.create(REF, prepared.request, 1)
    assert len(refusals) == 2 and node.node_id.startswith("i-")


def test_other_invalid_parameters_are_not_retried(aws, monkeypatch):
    sleeps = []
    monkeypatch.setattr("time.sleep", sleeps.append)
    prepared = aws.prepare(REF, request(storage=STORAGE))
    aws.api.client("us-east-1").meta.events.register_first(
        "before-call.ec2.RunInstances",
        lambda **_: refusal("InvalidParameterValue", "Invalid value for parameter disk"),
    )
    with pytest.raises(Exception, match="InvalidParameterValue"):
        aws.create(REF, prepared.request, 1)
    assert sleeps == []


def engine_uses(aws: AwsProvider, monkeypatch) -> None:
    """The real engine on this provider; bootstrap (SSH to the nodes) is left out."""
    monkeypatch.setattr("mlcloud.providers.get", lambda name: aws)
    monkeypatch.setattr(
        "mlcloud.provision.bootstrap.bootstrap",
        lambda p, ref, nodes, ssh, *agent, **kw: [
            state.NodeRecord(i, n.node_id, n.ip, n.private_ip, n.root, 0, None, n.status)
            for i, n in enumerate(nodes)
        ],
    )


def test_up_attaches_the_profile_and_down_removes_role_and_profile(aws, mlcloud_home, monkeypatch):
    engine_uses(aws, monkeypatch)
    spec = TaskSpec(
        provider="aws",
        nodes=1,
        region="us-east-1",
        resources=Resources(instance_type="g5.xlarge"),
        ssh=SshSpec(allowed_cidrs=("203.0.113.4/32",)),
        storage=StorageSpec(checkpoints="s3://my-ckpts/runs", data=("s3://corpus-eu/shards",)),
    )
    store = state.open_store()
    rec = lifecycle.up(store, "st", spec, PlainReporter())
    name = aws_iam.name_of(rec.uid)
    (instance,) = [
        i
        for r in aws.api.client("us-east-1").describe_instances()["Reservations"]
        for i in r["Instances"]
    ]
    assert instance["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/mlcloud/{name}")
    lifecycle.down(store, "st", PlainReporter())
    assert iam(aws).list_roles(PathPrefix="/mlcloud/")["Roles"] == []
    assert iam(aws).list_instance_profiles()["InstanceProfiles"] == []
    lifecycle.down(store, "st", PlainReporter())  # again: nothing left, no error


def test_gc_finds_and_deletes_a_leaked_role_and_profile(aws, mlcloud_home, monkeypatch):
    leaked = ClusterRef("gone", "gone-00ff00ff", "me-home", "us-east-1")
    aws.iam.ensure(leaked, STORAGE, "us-east-1", aws.api.tags(leaked, "x"))
    other = ClusterRef("far", "far-00ff00ff", "me-home", "eu-west-1")
    aws.iam.ensure(other, STORAGE, "eu-west-1", aws.api.tags(other, "x"))
    monkeypatch.setattr("mlcloud.providers.get", lambda name: aws)
    found = gc.find(state.open_store(), "aws", ["us-east-1"]).found
    assert {(r.kind, r.id, r.cluster_uid) for r in found} == {
        ("iam-role", f"mlcloud-{leaked.uid}", leaked.uid),
        ("instance-profile", f"mlcloud-{leaked.uid}", leaked.uid),
    }  # the eu-west-1 cluster's role is reported in its own region
    gc.delete(gc.decide(found, "me-home", None, 0, now=2e9))
    names = [r["RoleName"] for r in iam(aws).list_roles()["Roles"]]
    assert names == [f"mlcloud-{other.uid}"]
    profiles = iam(aws).list_instance_profiles()["InstanceProfiles"]
    assert [p["InstanceProfileName"] for p in profiles] == [f"mlcloud-{other.uid}"]
