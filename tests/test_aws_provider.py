"""The AWS provider in-process against moto (mock_aws): what RunInstances actually asks for,
failover on capacity and quota, retries on throttling, the typed errors, the AMI and login
user, a resumed `up` (same ClientToken, security group repaired), placement groups where the
endpoint has them and going without where it has not."""

from __future__ import annotations

from dataclasses import replace

import pytest
from mlcloud.providers.aws.provider import AwsProvider
from mlcloud.providers.base import (
    CapacityError,
    ClusterRef,
    ProvisionRequest,
    QuotaError,
    SshOptions,
)
from moto import mock_aws

from mlcloud import state
from mlcloud.errors import UsageError
from mlcloud.provision import handle, lifecycle
from mlcloud.report import PlainReporter
from mlcloud.spec.task import Resources, SshSpec, TaskSpec

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


def hook(p: AwsProvider, event: str, fn, region: str = "us-east-1") -> None:
    """Handlers go on the client: it copied the session's handlers when it was made."""
    p.api.client(region).meta.events.register_first(event, fn)


def answer(parsed: dict):
    """A before-call answer: the call succeeds with `parsed` and never reaches moto."""
    from botocore.awsrequest import AWSResponse

    parsed = {**parsed, "ResponseMetadata": {"HTTPStatusCode": 200}}
    return AWSResponse("https://ec2.us-east-1.amazonaws.com/", 200, {}, Raw(b"")), parsed


def with_placement_groups(p: AwsProvider, *regions: str) -> dict[str, dict]:
    """An endpoint that has placement groups (as EC2 has; moto has not): the three calls
    answered from a dict, by the query EC2 receives. Returns the dict (name -> tags)."""
    groups: dict[str, dict] = {}

    def create(params, **_):
        body = params["body"]
        tags = {
            body[k]: body[k[: -len("Key")] + "Value"]
            for k in body
            if k.startswith("TagSpecification.1.Tag.") and k.endswith(".Key")
        }
        groups[body["GroupName"]] = tags
        return answer({"PlacementGroup": {"GroupName": body["GroupName"]}})

    def describe(params, **_):
        body = params["body"]
        wanted = {v for k, v in body.items() if k.startswith("Filter.1.Value.")}
        out = [
            {
                "GroupName": name,
                "Strategy": "cluster",
                "State": "available",
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            }
            for name, tags in groups.items()
            if tags.get("mlcloud-cluster") in wanted or "mlcloud-cluster" in wanted
        ]
        return answer({"PlacementGroups": out})

    def delete(params, **_):
        groups.pop(params["body"]["GroupName"], None)
        return answer({})

    for region in regions or ("us-east-1",):
        hook(p, "before-call.ec2.CreatePlacementGroup", create, region)
        hook(p, "before-call.ec2.DescribePlacementGroups", describe, region)
        hook(p, "before-call.ec2.DeletePlacementGroup", delete, region)
    return groups


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
    """Run the real engine (lifecycle.up) on this provider; bootstrap, which needs SSH to the
    nodes, is the one step left out: these tests are about what reaches EC2."""
    monkeypatch.setattr("mlcloud.providers.get", lambda name: aws)
    monkeypatch.setattr(
        "mlcloud.provision.bootstrap.bootstrap",
        lambda p, ref, nodes, ssh, *agent, **kw: [
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
    groups = with_placement_groups(aws)
    prepared = aws.prepare(REF, request())
    assert prepared.warnings == ()
    assert groups[f"mlcloud-{REF.uid}"]["mlcloud-cluster"] == REF.uid
    nodes = aws.create(REF, replace(prepared.request, zone="us-east-1b"), 2)
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
    assert params["ImageId"] == "ami-0dlami2025"  # newest x86_64 Ubuntu PyTorch DLAMI
    for spec in params["TagSpecifications"]:
        tags = {t["Key"]: t["Value"] for t in spec["Tags"]}
        assert tags["mlcloud-cluster"] == REF.uid and tags["mlcloud-owner"] == "alice"
        assert tags["mlcloud-identity"] == "arn:aws:sts::123456789012:user/moto"
    assert {s["ResourceType"] for s in params["TagSpecifications"]} == {"instance", "volume"}

    ec2 = aws.api.client("us-east-1")
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
    rec = lifecycle.up(store, "c2", spec, PlainReporter(quiet=True))
    zones = [p["Placement"]["AvailabilityZone"] for p in aws.sent]
    assert zones == ["us-east-1a", "us-east-1b"]
    assert aws.sent[0]["ClientToken"] != aws.sent[1]["ClientToken"]  # a fresh token per try
    assert rec.spec["zone"] == "us-east-1b" and len(rec.nodes) == 2
    reservations = aws.api.client("us-east-1").describe_instances()["Reservations"]
    assert sum(len(r["Instances"]) for r in reservations) == 2


def test_no_capacity_anywhere_is_one_clear_error_and_nothing_left(aws, mlcloud_home, monkeypatch):
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("InsufficientInstanceCapacity"))
    engine_uses(aws, monkeypatch)
    spec = two_nodes("p4d.24xlarge")
    store = state.open_store()
    with pytest.raises(CapacityError, match="no capacity for 2 x p4d.24xlarge in us-east-1a"):
        lifecycle.up(store, "c3", spec, PlainReporter(quiet=True))
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


def test_each_instance_carries_its_number_and_each_try_its_token(aws):
    """A node's number (its `node-K` root, so its process tag) comes back with it from the
    listing, wherever the engine placed it; a later node (a replacement) is a new try with a
    token of its own, not the earlier instances handed back by EC2."""
    aws.prepare(REF, request())
    first = aws.create(REF, request(first_number=3), 2)
    assert [n.root for n in first] == [f"~/.mlcloud/{REF.uid}/node-{k}" for k in (3, 4)]
    later = aws.create(REF, request(count=1, first_number=5), 1)
    assert later[0].root.endswith("/node-5")
    assert sorted(n.root for n in aws.list(REF)) == sorted(n.root for n in first + later)
    one = aws.create(REF, request(count=1, first_number=6), 1)
    assert len({p["ClientToken"] for p in aws.sent}) == 3  # moto hands back on a token reuse
    aws.terminate(REF, first + later + one)


def test_no_capacity_in_the_region_moves_to_the_next_and_cleans_up(aws, mlcloud_home, monkeypatch):
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("InsufficientInstanceCapacity"))
    engine_uses(aws, monkeypatch)
    spec = two_nodes("p4d.24xlarge")
    rec = lifecycle.up(
        state.open_store(), "c4", spec, PlainReporter(quiet=True), fallback_regions=("us-west-2",)
    )
    assert rec.spec["region"] == "us-west-2" and len(rec.nodes) == 2
    assert aws.discover("us-east-1") == []  # the first region's group and key pair are gone
    kinds = sorted(r.kind for r in aws.discover("us-west-2"))
    assert kinds == ["instance", "instance", "key-pair", "security-group"]  # moto: no PG


def test_failover_across_regions_keeps_one_cluster_key(aws, mlcloud_home, monkeypatch):
    """The key file is the engine's: the region left behind loses its key pair, not the key,
    so every region gets the same public key; `down` removes the file at the end."""
    from mlcloud.remote import keys

    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("InsufficientInstanceCapacity"))
    imported: list[bytes] = []
    for region in ("us-east-1", "us-west-2"):
        hook(
            aws,
            "provide-client-params.ec2.ImportKeyPair",
            lambda params, **_: imported.append(params["PublicKeyMaterial"]),
            region,
        )
    engine_uses(aws, monkeypatch)
    store = state.open_store()
    spec = two_nodes("p4d.24xlarge")
    rec = lifecycle.up(
        store, "k2", spec, PlainReporter(quiet=True), fallback_regions=("us-west-2",)
    )
    assert rec.spec["region"] == "us-west-2"
    path, public = keys.ensure_cluster_key(rec.uid)
    assert imported == [public.encode(), public.encode()]
    lifecycle.down(store, "k2", PlainReporter(quiet=True))
    assert not path.exists()


class Killed(BaseException):
    """`up` dying on the spot (kill -9): no rollback runs, state stays as it was."""


def warnings_of(report) -> list[str]:
    out: list[str] = []
    report.warn = out.append
    return out


def test_default_ami_is_the_ubuntu_build_though_al2023_is_newer(aws, mlcloud_home, monkeypatch):
    # tests/data/amis.json: the newest x86_64 PyTorch DLAMI is an Amazon Linux 2023 build
    prepared = aws.prepare(REF, request(count=1))
    assert prepared.request.image == "ami-0dlami2025"
    assert prepared.request.ssh.user == "ubuntu"
    engine_uses(aws, monkeypatch)
    spec = replace(two_nodes("g5.xlarge"), nodes=1)
    store = state.open_store()
    rec = lifecycle.up(store, "ami", spec, PlainReporter(quiet=True))
    assert aws.sent[-1]["ImageId"] == "ami-0dlami2025"
    # the login user reaches every later command through the recorded spec
    assert rec.spec["ssh"]["user"] == "ubuntu" and rec.spec["image"] == "ami-0dlami2025"
    h = handle.open_cluster(store, "ami")
    assert h.transports[0].target.user == "ubuntu"
    h.close()


def test_login_user_follows_an_asked_image(aws):
    def user(image, ssh_user=None):
        r = request(count=1, image=image, ssh=replace(SSH, user=ssh_user))
        return aws.prepare(REF, r).request.ssh.user

    assert user("ami-0al2023") == "ec2-user"
    assert user("ami-0ubuntu") == "ubuntu"
    assert user("ami-0al2023", "root") == "root"  # ssh.user wins
    assert user("ami-0mystery", "trainer") == "trainer"
    with pytest.raises(UsageError, match="ami-0mystery.*set ssh.user") as e:
        user("ami-0mystery")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="image ami-12345678 not found in us-east-1"):
        user("ami-12345678")


def test_every_ec2_state_maps_onto_mlclouds():
    import botocore.session
    from mlcloud.providers.aws.provider import STATUS
    from mlcloud.providers.base import NODE_STATUSES

    ec2 = botocore.session.get_session().get_service_model("ec2")
    assert set(STATUS) == set(ec2.shape_for("InstanceStateName").enum)
    assert set(STATUS.values()) == set(NODE_STATUSES)


def test_login_user_table():
    from mlcloud.providers.aws.images import login_user

    assert login_user("debian-12-amd64-20250101") == "admin"
    assert login_user("al2023-ami-2023.6.20250101-kernel-6.1-x86_64") == "ec2-user"
    assert login_user("x", "Amazon Linux 2023 AMI") == "ec2-user"
    assert login_user("RHEL-9.4.0_HVM") == "ec2-user"
    assert login_user("team-trainer-v7", "a team's own build") is None


def test_no_placement_groups_warns_once_and_goes_without(aws, mlcloud_home, monkeypatch):
    """moto, like many endpoints, lacks placement groups: up, down and gc go on without."""
    zones = []

    def refuse_zone_a(params, **_):
        zones.append(params["body"].get("Placement.AvailabilityZone"))
        if zones[-1] == "us-east-1a":
            return refusal("InsufficientInstanceCapacity")
        return None

    hook(aws, "before-call.ec2.RunInstances", refuse_zone_a)
    engine_uses(aws, monkeypatch)
    report = PlainReporter(quiet=True)
    warned = warnings_of(report)
    store = state.open_store()
    rec = lifecycle.up(store, "nopg", two_nodes("g5.xlarge"), report)
    assert zones == ["us-east-1a", "us-east-1b"] and len(rec.nodes) == 2
    assert all("GroupName" not in p.get("Placement", {}) for p in aws.sent)
    pg = [w for w in warned if "placement group" in w]
    assert len(pg) == 1 and "go without" in pg[0] and "\n" not in pg[0]  # once, two prepares
    assert len(aws.discover("us-east-1")) == 4  # 2 instances, key pair, security group
    assert lifecycle.down(store, "nopg", PlainReporter(quiet=True))
    assert aws.discover("us-east-1") == []


def test_placement_group_used_and_removed_where_the_endpoint_has_them(
    aws, mlcloud_home, monkeypatch
):
    groups = with_placement_groups(aws)
    engine_uses(aws, monkeypatch)
    store = state.open_store()
    rec = lifecycle.up(store, "pg", two_nodes("g5.xlarge"), PlainReporter(quiet=True))
    assert aws.sent[-1]["Placement"]["GroupName"] == f"mlcloud-{rec.uid}"
    assert "placement-group" in {r.kind for r in aws.discover("us-east-1")}
    assert lifecycle.down(store, "pg", PlainReporter(quiet=True))
    assert groups == {}


def test_resumed_up_sends_the_same_client_token(aws, mlcloud_home, monkeypatch):
    """Killed between RunInstances and the state write: the re-run asks again, in the
    recorded zone with the same token, so EC2 (which moto does not imitate) launches once."""
    tokens: list[tuple[str, str]] = []

    def kill_after_sending(params, **_):
        body = params["body"]
        tokens.append((body.get("Placement.AvailabilityZone"), body["ClientToken"]))
        if body.get("Placement.AvailabilityZone") == "us-east-1a":
            return refusal("InsufficientInstanceCapacity")
        if len(tokens) == 2:
            raise Killed  # the request is out; the answer never reaches state
        return None

    hook(aws, "before-call.ec2.RunInstances", kill_after_sending)
    engine_uses(aws, monkeypatch)
    monkeypatch.setattr(
        "mlcloud.provision.lifecycle._rollback", lambda *a: None
    )  # kill -9: no rollback
    store = state.open_store()
    with pytest.raises(Killed):
        lifecycle.up(store, "resume", two_nodes("g5.xlarge"), PlainReporter(quiet=True))
    assert store.get_cluster("resume").spec["zone"] == "us-east-1b"
    rec = lifecycle.up(store, "resume", two_nodes("g5.xlarge"), PlainReporter(quiet=True))
    assert tokens[2] == tokens[1]  # same zone, same token
    assert tokens[1][0] == "us-east-1b" and tokens[0][1] != tokens[1][1]
    assert rec.spec["zone"] == "us-east-1b" and len(rec.nodes) == 2
    images = {p["ImageId"] for p in aws.sent}
    assert images == {"ami-0dlami2025"}  # the same parameters too


def rules_of(aws: AwsProvider, uid: str) -> list[dict]:
    ec2 = aws.api.client("us-east-1")
    f = [{"Name": "tag:mlcloud-cluster", "Values": [uid]}]
    (sg,) = ec2.describe_security_groups(Filters=f)["SecurityGroups"]
    return sg["IpPermissions"]


def ssh_cidrs(rules: list[dict]) -> list[str]:
    return sorted(ip["CidrIp"] for r in rules if r.get("FromPort") == 22 for ip in r["IpRanges"])


def test_security_group_repaired_and_extended_on_resume_never_narrowed(aws):
    # a crash between CreateSecurityGroup and AuthorizeSecurityGroupIngress
    aws.api.identity("us-east-1")
    sg = aws.network.create_security_group(REF, "us-east-1")
    assert rules_of(aws, REF.uid) == []
    aws.prepare(REF, request(count=1))
    rules = rules_of(aws, REF.uid)
    assert ssh_cidrs(rules) == ["203.0.113.4/32"]
    assert any(
        g["GroupId"] == sg for r in rules if r["IpProtocol"] == "-1" for g in r["UserIdGroupPairs"]
    )
    # the user's own rule, then an `up` from a new address
    aws.api.client("us-east-1").authorize_security_group_ingress(
        GroupId=sg,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 8888,
                "ToPort": 8888,
                "IpRanges": [{"CidrIp": "10.0.0.0/8"}],
            }
        ],
    )
    moved = replace(SSH, allowed_cidrs=("198.51.100.7/32",))
    aws.prepare(REF, request(count=1, ssh=moved))
    rules = rules_of(aws, REF.uid)
    assert ssh_cidrs(rules) == ["198.51.100.7/32", "203.0.113.4/32"]  # added, none removed
    assert any(r.get("FromPort") == 8888 for r in rules)
    before = rules
    aws.prepare(REF, request(count=1, ssh=moved))  # nothing missing: nothing sent
    assert rules_of(aws, REF.uid) == before


def test_missing_rules():
    from mlcloud.providers.aws.network import missing_rules

    wide = [
        {
            "IpProtocol": "tcp",
            "FromPort": 0,
            "ToPort": 65535,
            "IpRanges": [{"CidrIp": "10.0.0.0/8"}],
        },
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-1"}]},
    ]
    assert missing_rules("sg-1", wide, ["10.1.2.3/32"]) == []  # inside a wider rule
    (ssh,) = missing_rules("sg-1", wide, ["2001:db8::1/128"])
    assert ssh["Ipv6Ranges"][0]["CidrIpv6"] == "2001:db8::1/128" and "IpRanges" not in ssh
    assert len(missing_rules("sg-1", [], ["10.1.2.3/32"])) == 2


def test_quota_moves_to_the_next_region_skipping_its_other_zones(aws, mlcloud_home, monkeypatch):
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("VcpuLimitExceeded"))
    engine_uses(aws, monkeypatch)
    west: list[dict] = []
    hook(
        aws,
        "provide-client-params.ec2.RunInstances",
        lambda params, **_: west.append(params),
        "us-west-2",
    )
    rec = lifecycle.up(
        state.open_store(),
        "quota",
        two_nodes("p4d.24xlarge"),
        PlainReporter(quiet=True),
        fallback_regions=("us-west-2",),
    )
    # aws.sent holds us-east-1's requests: one zone only, then on to us-west-2
    assert [p["Placement"]["AvailabilityZone"] for p in aws.sent] == ["us-east-1a"]
    assert [p["Placement"]["AvailabilityZone"] for p in west] == ["us-west-2a"]
    assert rec.spec["region"] == "us-west-2" and len(rec.nodes) == 2
    assert aws.discover("us-east-1") == []


def test_quota_everywhere_exits_4_capacity_somewhere_exits_3(aws, mlcloud_home, monkeypatch):
    from mlcloud.errors import EXIT_CAPACITY, EXIT_QUOTA

    west = ["VcpuLimitExceeded"]
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("VcpuLimitExceeded"))
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal(west[0]), "us-west-2")
    engine_uses(aws, monkeypatch)
    store = state.open_store()
    args = (two_nodes("p4d.24xlarge"), PlainReporter(quiet=True))
    with pytest.raises(QuotaError) as e:
        lifecycle.up(store, "q4", *args, fallback_regions=("us-west-2",))
    assert e.value.exit_code == EXIT_QUOTA
    assert str(e.value).startswith("over quota for 2 x p4d.24xlarge in us-east-1, us-west-2:")
    assert store.get_cluster("q4") is None
    west[0] = "InsufficientInstanceCapacity"
    with pytest.raises(CapacityError) as e:
        lifecycle.up(store, "q3", *args, fallback_regions=("us-west-2",))
    assert e.value.exit_code == EXIT_CAPACITY
    assert "us-west-2a, us-west-2b" in str(e.value) and "over quota in us-east-1" in str(e.value)


def test_unclassified_sdk_error_is_one_line(aws):
    from mlcloud.providers.base import ProviderError

    hook(aws, "before-call.ec2.DescribeAvailabilityZones", lambda **_: refusal("Odd\nThing", 400))
    with pytest.raises(ProviderError) as e:
        aws.placements(request(count=1))
    message = str(e.value)
    assert message.startswith("aws: DescribeAvailabilityZones in us-east-1 failed: Odd")
    assert message.endswith("--debug for details") and "\n" not in message


def test_instance_type_and_region_checked_before_anything(aws):
    with pytest.raises(UsageError, match="--instance-type nosuch.huge: not an EC2 instance type"):
        aws.check(request(instance_type="nosuch.huge"))
    with pytest.raises(UsageError, match="did you mean g5.xlarge"):
        aws.check(request(instance_type="g5.xlarg"))
    with pytest.raises(UsageError, match="--region mars-1: not an AWS region"):
        aws.check(request(region="mars-1"))
    with pytest.raises(UsageError, match="did you mean .*us-east-1"):
        aws.check(request(region="us-east-l"))
    aws.check(request(instance_type="t3.micro", region="eu-west-1"))  # not GPUs, still known


def test_a_missing_profile_is_a_credentials_error(aws_env, monkeypatch):
    from mlcloud.providers.base import AuthError

    from mlcloud.errors import EXIT_AUTH

    monkeypatch.setenv("AWS_PROFILE", "nosuch")
    with pytest.raises(AuthError) as e:
        AwsProvider().check(request(count=1))
    assert e.value.exit_code == EXIT_AUTH and "(nosuch) could not be found" in str(e.value)


def test_placement_group_refused_is_a_warning_not_a_failure(aws):
    """Describing works but making one is refused (an IAM policy without the permission)."""
    hook(aws, "before-call.ec2.CreatePlacementGroup", lambda **_: refusal("UnauthorizedOperation"))
    with_placement_groups(aws)  # its handlers come after the refusal
    prepared = aws.prepare(REF, request())
    (warning,) = prepared.warnings
    assert "UnauthorizedOperation" in warning and warning.endswith("the nodes go without one")
    aws.create(REF, replace(prepared.request, zone="us-east-1a"), 2)
    assert "GroupName" not in aws.sent[-1]["Placement"]
    assert aws.prepare(REF, request()).warnings == ()  # said once


# One placement path for `up` and `add_nodes` (mlcloud/provision/lifecycle.py: _place)


def up_in_zone_a(aws, monkeypatch, name: str) -> tuple[state.Store, handle.Handle]:
    engine_uses(aws, monkeypatch)
    store = state.open_store()
    spec = replace(two_nodes("g5.xlarge"), zone="us-east-1a")
    lifecycle.up(store, name, replace(spec, zone=None), PlainReporter(quiet=True))
    return store, handle.open_cluster(store, name)


def live(aws) -> list[str]:
    out = aws.api.client("us-east-1").describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    )["Reservations"]
    return sorted(i["InstanceId"] for r in out for i in r["Instances"])


def test_add_nodes_fails_over_zone_by_zone_and_records_where(aws, mlcloud_home, monkeypatch):
    store, h = up_in_zone_a(aws, monkeypatch, "grow")
    assert h.record.spec["zone"] == "us-east-1a"

    def refuse_zone_a(params, **_):
        if params["body"].get("Placement.AvailabilityZone") == "us-east-1a":
            return refusal("InsufficientInstanceCapacity")
        return None

    hook(aws, "before-call.ec2.RunInstances", refuse_zone_a)
    try:
        new = lifecycle.add_nodes(store, h, 1, PlainReporter(quiet=True))
        zones = [p["Placement"]["AvailabilityZone"] for p in aws.sent]
        assert zones == ["us-east-1a", "us-east-1a", "us-east-1b"]  # the cluster's zone first
        assert len({p["ClientToken"] for p in aws.sent}) == 3
        assert new.nodes[0].root.endswith("/node-2") and len(live(aws)) == 3
        kinds = [(kind, message) for _, kind, message in store.events("grow")]
        assert ("placed", f"{new.nodes[0].node_id} made in us-east-1b") in kinds
        assert any(k == "capacity" for k, _ in kinds)
        assert store.get_cluster("grow").spec["zone"] == "us-east-1a"  # the cluster's own
    finally:
        h.close()
        lifecycle.down(store, "grow", PlainReporter(quiet=True))


def test_add_nodes_over_quota_leaves_the_region_at_once(aws, mlcloud_home, monkeypatch):
    store, h = up_in_zone_a(aws, monkeypatch, "quota")
    hook(aws, "before-call.ec2.RunInstances", lambda **_: refusal("VcpuLimitExceeded"))
    try:
        with pytest.raises(QuotaError, match="over quota for 1 more x g5.xlarge in us-east-1"):
            lifecycle.add_nodes(store, h, 1, PlainReporter(quiet=True))
        assert len(aws.sent) == 2  # up's, then one try: no other zone of the region
        assert len(live(aws)) == 2
    finally:
        h.close()
        lifecycle.down(store, "quota", PlainReporter(quiet=True))


def test_a_launch_that_fails_after_ec2_made_it_terminates_only_that(aws, mlcloud_home, monkeypatch):
    """The instances launched, then never ran (the wait failed): this attempt's instance is
    terminated, the cluster's stay, and its numbers (so its token) are not used again."""
    from mlcloud.providers.base import ProviderError

    store, h = up_in_zone_a(aws, monkeypatch, "wait")
    before = live(aws)
    real_wait = aws.api.wait

    def wait(region, ids, waiter):
        if waiter == "instance_running":
            raise ProviderError(f"EC2 instances {', '.join(ids)} did not reach running")
        real_wait(region, ids, waiter)

    monkeypatch.setattr(aws.api, "wait", wait)
    try:
        with pytest.raises(ProviderError, match="did not reach running"):
            lifecycle.add_nodes(store, h, 1, PlainReporter(quiet=True))
        assert live(aws) == before
        monkeypatch.setattr(aws.api, "wait", real_wait)
        new = lifecycle.add_nodes(store, h, 1, PlainReporter(quiet=True))
        assert new.nodes[0].root.endswith("/node-3")
        assert aws.sent[1]["ClientToken"] != aws.sent[2]["ClientToken"]
    finally:
        h.close()
        lifecycle.down(store, "wait", PlainReporter(quiet=True))


def test_a_resumed_up_whose_bootstrap_fails_terminates_only_what_it_made(
    aws, mlcloud_home, monkeypatch
):
    engine_uses(aws, monkeypatch)
    monkeypatch.setattr("mlcloud.provision.lifecycle._rollback", lambda *a: None)
    real_bootstrap = lifecycle.bootstrap.bootstrap

    def killed(*a, **kw):
        raise Killed

    monkeypatch.setattr(lifecycle.bootstrap, "bootstrap", killed)
    store = state.open_store()
    with pytest.raises(Killed):  # kill -9 mid-bootstrap: two instances, the row INIT
        lifecycle.up(store, "again", two_nodes("g5.xlarge"), PlainReporter(quiet=True))
    ref = handle.ref_of(store.get_cluster("again"))
    first, second = (n.node_id for n in aws.list(ref))  # node-0, node-1
    aws.api.client("us-east-1").terminate_instances(InstanceIds=[second])

    def failing(*a, **kw):
        raise lifecycle.RemoteError("node2: bootstrap failed")

    monkeypatch.setattr(lifecycle.bootstrap, "bootstrap", failing)
    with pytest.raises(lifecycle.RemoteError):
        lifecycle.up(store, "again", two_nodes("g5.xlarge"), PlainReporter(quiet=True))
    assert len(aws.sent) == 2  # one node asked again, with numbers of its own
    assert live(aws) == [first]  # what was there before stays for the next run
    monkeypatch.setattr(lifecycle.bootstrap, "bootstrap", real_bootstrap)
    engine_uses(aws, monkeypatch)
    rec = lifecycle.up(store, "again", two_nodes("g5.xlarge"), PlainReporter(quiet=True))
    assert len(rec.nodes) == 2 and rec.nodes[0].node_id == first
    roots = sorted(n.root.rsplit("/", 1)[1] for n in rec.nodes)
    assert roots == ["node-0", "node-3"]  # node-2's attempt failed: its number is not reused
    assert len({p["ClientToken"] for p in aws.sent}) == 3
    lifecycle.down(store, "again", PlainReporter(quiet=True))
