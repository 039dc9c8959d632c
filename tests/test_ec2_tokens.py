"""The EC2 stand-in with real idempotency (tests/fakes/ec2_tokens.py) against boto3, and the
AWS provider's ClientTokens through it: the same attempt is served once, every new one
launches."""

from __future__ import annotations

from dataclasses import replace

import boto3
import pytest
from botocore.exceptions import ClientError
from mlcloud.providers.aws.provider import AwsProvider
from mlcloud.providers.base import ClusterRef, ProvisionRequest, SshOptions

pytestmark = pytest.mark.e2e


def ec2(region: str = "us-east-1"):
    return boto3.client("ec2", region_name=region)


def launch(token: str | None, region: str = "us-east-1", **kw) -> dict:
    params = {"ImageId": "ami-0ubuntu", "MinCount": 1, "MaxCount": 1, "InstanceType": "t3.micro"}
    params.update(kw)
    if token:
        params["ClientToken"] = token
    return ec2(region).run_instances(**params)


def ids(answer: dict) -> list[str]:
    return [i["InstanceId"] for i in answer["Instances"]]


def all_instances(region: str = "us-east-1") -> list[str]:
    out = ec2(region).describe_instances()["Reservations"]
    return [i["InstanceId"] for r in out for i in r["Instances"]]


def test_a_seen_token_launches_nothing_and_answers_as_the_first_time(moto_server, ec2_stand_in):
    first = launch("tok-1")
    again = launch("tok-1")
    assert again["ReservationId"] == first["ReservationId"] and ids(again) == ids(first)
    assert all_instances() == ids(first)
    assert (ec2_stand_in.launches, ec2_stand_in.replays) == (1, 1)
    # even once they are terminated: EC2 hands the gone instances back, launches nothing
    ec2().terminate_instances(InstanceIds=ids(first))
    assert ids(launch("tok-1")) == ids(first) and all_instances() == ids(first)


def test_other_tokens_regions_or_none_launch(moto_server, ec2_stand_in):
    a, b, c = launch("tok-a"), launch("tok-b"), launch(None)
    d = launch("tok-a", region="us-west-2")  # tokens are per region
    assert len({*ids(a), *ids(b), *ids(c), *ids(d)}) == 4
    # botocore gives a call without one a fresh token of its own
    assert ec2_stand_in.launches == 4 and ec2_stand_in.replays == 0


def test_a_seen_token_with_other_parameters_is_a_mismatch(moto_server):
    launch("tok-m")
    with pytest.raises(ClientError) as e:
        launch("tok-m", Placement={"AvailabilityZone": "us-east-1b"})
    assert e.value.response["Error"]["Code"] == "IdempotentParameterMismatch"
    assert len(all_instances()) == 1


def test_a_refused_launch_binds_no_token(moto_server, ec2_stand_in):
    with pytest.raises(ClientError):
        launch("tok-r", SecurityGroupIds=["sg-0nosuch"])
    assert ids(launch("tok-r")) and ec2_stand_in.launches == 1


def test_reset_forgets_the_tokens(moto_server, ec2_stand_in):
    import urllib.request

    launch("tok-z")
    req = urllib.request.Request(f"{moto_server}/moto-api/reset", data=b"", method="POST")
    urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30).close()
    assert all_instances() == [] and ec2_stand_in.seen == {}
    assert ids(launch("tok-z"))


REF = ClusterRef("c1", "c1-0123abcd", "alice", "us-east-1")


def request(**kw) -> ProvisionRequest:
    base = dict(
        count=1,
        instance_type="g5.xlarge",
        region="us-east-1",
        zone="us-east-1a",
        ssh=SshOptions(allowed_cidrs=("203.0.113.4/32",)),
    )
    return ProvisionRequest(**{**base, **kw})


def test_the_provider_is_served_once_per_attempt_and_anew_for_new_numbers(
    moto_server, ec2_stand_in
):
    """A resumed attempt (same cluster, same numbers) gets its instances back; a replacement
    (the next number) is a launch of its own, in the same zone."""
    aws = AwsProvider()
    req = aws.prepare(REF, request(count=2)).request
    first = aws.create(REF, req, 2)
    assert [n.node_id for n in aws.create(REF, req, 2)] == [n.node_id for n in first]
    assert ec2_stand_in.launches == 1
    aws.terminate(REF, first[1:])
    one = aws.create(REF, replace(req, count=1, first_number=2), 1)
    two = aws.create(REF, replace(req, count=1, first_number=3), 1)
    assert ec2_stand_in.launches == 3
    roots = sorted(n.root.rsplit("/", 1)[1] for n in aws.list(REF))  # listed in id order
    assert roots == ["node-0", "node-2", "node-3"]
    aws.terminate(REF, [first[0], *one, *two])
    aws.cleanup(REF)


def test_the_token_fits_ec2s_64_characters_for_the_longest_name(moto_server):
    sent: list[str] = []
    aws = AwsProvider()
    aws.api.client("us-east-1").meta.events.register(
        "provide-client-params.ec2.RunInstances",
        lambda params, **_: sent.append(params["ClientToken"]),
    )
    ref = ClusterRef("a" * 40, "a" * 40 + "-0123abcd", "alice", "us-east-1")
    req = aws.prepare(ref, request()).request
    aws.terminate(ref, aws.create(ref, req, 1))
    aws.cleanup(ref)
    assert len(sent[0]) <= 64 and sent[0].startswith(ref.uid)
