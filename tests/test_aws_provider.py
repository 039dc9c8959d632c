"""The AWS provider in-process against moto (mock_aws): what RunInstances actually asks for,
failover on capacity, retries on throttling, the typed errors, the AMI choice."""

from __future__ import annotations

import pytest
from mlcloud.providers.aws import AwsProvider
from mlcloud.providers.base import (
    CapacityError,
    ClusterRef,
    ProvisionRequest,
    QuotaError,
    SshOptions,
)
from moto import mock_aws

from mlcloud import cluster, state
from mlcloud.report import PlainReporter
from mlcloud.spec import Resources, SshSpec, TaskSpec

REF = ClusterRef("c1", "c1-0123abcd", "alice", "us-east-1")
SSH = SshOptions(allowed_cidrs=("203.0.113.4/32",))


class Raw:
    """What botocore reads an HTTP body from."""

    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_):
        yield self.body


def refusal(code: str, status: int = 400):
    """A before-call answer: the call fails with `code` and never reaches moto."""
    from botocore.awsrequest import AWSResponse

    parsed = {
        "Error": {"Code": code, "Message": f"injected {code}"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return AWSResponse("https://ec2.us-east-1.amazonaws.com/", status, {}, Raw(b"")), parsed


def ec2_error(code: str, status: int = 400):
    from botocore.awsrequest import AWSResponse

    body = (
        f"<Response><Errors><Error><Code>{code}</Code><Message>injected {code}</Message>"
        f"</Error></Errors><RequestID>r-1</RequestID></Response>"
    ).encode()
    return AWSResponse("https://ec2.us-east-1.amazonaws.com/", status, {}, Raw(body))


def hook(p: AwsProvider, event: str, fn) -> None:
    """Handlers go on the client: it copied the session's handlers when it was made."""
    p.client("us-east-1").meta.events.register_first(event, fn)


@pytest.fixture
def aws(aws_env):
    with mock_aws():
        p = AwsProvider()
        sent: list[dict] = []
        hook(p, "provide-client-params.ec2.RunInstances", lambda params, **_: sent.append(params))
        p.sent = sent
        yield p


def request(**kw) -> ProvisionRequest:
    base = dict(count=2, instance_type="g5.xlarge", region="us-east-1", ssh=SSH)
    return ProvisionRequest(**{**base, **kw})


def engine_uses(aws: AwsProvider, monkeypatch) -> None:
    """Run the real engine (cluster.up) on this provider; bootstrap, which needs SSH to the
    nodes, is the one step left out: these tests are about what reaches EC2."""
    monkeypatch.setattr("mlcloud.providers.get", lambda name: aws)
    monkeypatch.setattr(
        "mlcloud.cluster.bootstrap",
        lambda p, ref, nodes, ssh: [
            state.NodeRecord(i, n.node_id, n.ip, n.private_ip, n.root, 0, None, n.status)
            for i, n in enumerate(nodes)
        ],
    )


def two_nodes(instance_type: str) -> TaskSpec:
    return TaskSpec(
        provider="aws",
        nodes=2,
        region="us-east-1",
        resources=Resources(instance_type=instance_type),
        ssh=SshSpec(allowed_cidrs=("203.0.113.4/32",)),
    )


def test_secure_defaults_in_the_actual_request(aws):
    aws.prepare(REF, request())
    nodes = aws.create(REF, request(zone="us-east-1b"), 2)
    assert len(nodes) == 2 and all(n.node_id.startswith("i-") for n in nodes)
    (params,) = aws.sent
    assert params["MinCount"] == params["MaxCount"] == 2
    assert params["MetadataOptions"]["HttpTokens"] == "required"
    assert params["InstanceInitiatedShutdownBehavior"] == "terminate"
    ebs = params["BlockDeviceMappings"][0]["Ebs"]
    assert ebs["Encrypted"] is True and ebs["DeleteOnTermination"] is True
    assert "IamInstanceProfile" not in params and "UserData" not in params
    assert params["ClientToken"].startswith(REF.uid)
    assert params["KeyName"] == f"mlcloud-{REF.uid}"
    assert params["Placement"] == {
        "AvailabilityZone": "us-east-1b",
        "GroupName": f"mlcloud-{REF.uid}",
    }
    assert params["ImageId"] == "ami-0dlami2025"  # newest x86_64 PyTorch DLAMI
    for spec in params["TagSpecifications"]:
        tags = {t["Key"]: t["Value"] for t in spec["Tags"]}
        assert tags["mlcloud-cluster"] == REF.uid and tags["mlcloud-owner"] == "alice"
    assert {s["ResourceType"] for s in params["TagSpecifications"]} == {"instance", "volume"}

    ec2 = aws.client("us-east-1")
    (sg,) = ec2.describe_security_groups(GroupIds=params["SecurityGroupIds"])["SecurityGroups"]
    rules = sg["IpPermissions"]
    ssh = [r for r in rules if r.get("FromPort") == 22]
    assert ssh and [ip["CidrIp"] for ip in ssh[0]["IpRanges"]] == ["203.0.113.4/32"]
    everything = [r for r in rules if r["IpProtocol"] == "-1"]
    assert everything[0]["UserIdGroupPairs"][0]["GroupId"] == sg["GroupId"]
    assert not [r for r in rules if r.get("IpRanges") and r.get("FromPort") != 22]
    volumes = ec2.describe_volumes(Filters=[{"Name": "tag:mlcloud-cluster", "Values": [REF.uid]}])[
        "Volumes"
    ]
    assert volumes and all(v["Encrypted"] for v in volumes)


def test_spot_request(aws):
    aws.prepare(REF, request(count=1))
    aws.create(REF, request(count=1, spot=True, max_price=1.5), 1)
    market = aws.sent[0]["InstanceMarketOptions"]
    assert market["MarketType"] == "spot" and market["SpotOptions"]["MaxPrice"] == "1.5000"


def test_capacity_in_zone_a_granted_in_b_nothing_left_behind(aws, mlcloud_home, monkeypatch):
    def refuse_zone_a(params, **_):
        if params["body"].get("Placement.AvailabilityZone") == "us-east-1a":
            return refusal("InsufficientInstanceCapacity")
        return None

    hook(aws, "before-call.ec2.RunInstances", refuse_zone_a)
    engine_uses(aws, monkeypatch)
    spec = two_nodes("g5.xlarge")
    store = state.open_store()
    rec = cluster.up(store, "c2", spec, PlainReporter(quiet=True))
    zones = [p["Placement"]["AvailabilityZone"] for p in aws.sent]
    assert zones == ["us-east-1a", "us-east-1b"]
    assert aws.sent[0]["ClientToken"] != aws.sent[1]["ClientToken"]  # a fresh token per try
    assert rec.spec["zone"] == "us-east-1b" and len(rec.nodes) == 2
    reservations = aws.client("us-east-1").describe_instances()["Reservations"]
    assert sum(len(r["Instances"]) for r in reservations) == 2


def test_no_capacity_anywhere_is_one_clear_error_and_nothing_left(aws, mlcloud_home, monkeypatch):
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("InsufficientInstanceCapacity"))
    engine_uses(aws, monkeypatch)
    spec = two_nodes("p4d.24xlarge")
    store = state.open_store()
    with pytest.raises(CapacityError, match="no capacity for 2 x p4d.24xlarge in us-east-1a"):
        cluster.up(store, "c3", spec, PlainReporter(quiet=True))
    assert store.get_cluster("c3") is None
    assert aws.discover("us-east-1") == []  # security group, key pair, placement group gone


def test_throttling_is_retried(aws):
    calls = []

    def throttle_twice(**_):
        calls.append(1)
        return ec2_error("RequestLimitExceeded", 503) if len(calls) <= 2 else None

    hook(aws, "before-send.ec2.RunInstances", throttle_twice)
    aws.prepare(REF, request(count=1))
    # botocore's standard mode retried the throttled sends (moto, behind the injected
    # answers, still ran them: only the count of tries and the outcome are meaningful here)
    assert len(aws.create(REF, request(count=1), 1)) >= 1
    assert len(calls) == 3


def test_quota_and_auth_errors_are_typed(aws):
    from mlcloud.providers.base import AuthError

    aws.prepare(REF, request(count=1))
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("VcpuLimitExceeded"))
    with pytest.raises(QuotaError, match="quota"):
        aws.create(REF, request(count=1), 1)
    hook(aws, "before-call.ec2.DescribeInstances", lambda **_: refusal("AuthFailure", 401))
    with pytest.raises(AuthError, match="aws configure"):
        aws.list(REF)


def test_reuse_by_tag_after_a_crash(aws):
    aws.prepare(REF, request())
    first = aws.create(REF, request(), 2)
    # a re-run lists by tag and finds them: moto ignores ClientToken, our own reuse must not
    assert [n.node_id for n in aws.list(REF)] == [n.node_id for n in first]
    aws.terminate(REF, first)
    assert aws.list(REF) == []
    aws.cleanup(REF)
    aws.cleanup(REF)  # idempotent
    assert aws.discover("us-east-1") == []


def test_no_capacity_in_the_region_moves_to_the_next_and_cleans_up(aws, mlcloud_home, monkeypatch):
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("InsufficientInstanceCapacity"))
    engine_uses(aws, monkeypatch)
    spec = two_nodes("p4d.24xlarge")
    rec = cluster.up(
        state.open_store(), "c4", spec, PlainReporter(quiet=True), fallback_regions=("us-west-2",)
    )
    assert rec.spec["region"] == "us-west-2" and len(rec.nodes) == 2
    assert aws.discover("us-east-1") == []  # the first region's group and key pair are gone
    kinds = sorted(r.kind for r in aws.discover("us-west-2"))
    assert kinds == ["instance", "instance", "key-pair", "placement-group", "security-group"]
