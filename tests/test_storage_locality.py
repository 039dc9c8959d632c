"""`storage.data` feeds `--near`: the bucket's region is asked of S3 (GetBucketLocation, else
the region header of HeadBucket), kept in the home's cache, and when it cannot be asked `up`
goes on, saying what it assumed."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from moto import mock_aws

from mlcloud.errors import UsageError
from mlcloud.spec.locality import DataPlace, locate, locate_data


@pytest.fixture
def s3(aws_env, mlcloud_home):
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name="eu-central-1")
        s3.create_bucket(
            Bucket="corpus", CreateBucketConfiguration={"LocationConstraint": "eu-central-1"}
        )
        yield boto3.session.Session()


def test_the_region_is_looked_up_once_then_cached(s3, mlcloud_home, monkeypatch):
    said: list[str] = []
    assert locate_data(("s3://corpus/shards",), said.append) == DataPlace("aws", "eu-central-1")
    assert said == []
    cache = json.loads((mlcloud_home / "cache" / "buckets.json").read_text())
    assert cache["s3://corpus"]["region"] == "eu-central-1"
    monkeypatch.setenv("MLCLOUD_OFFLINE", "1")
    assert locate("s3://corpus/other") == DataPlace("aws", "eu-central-1")  # from the cache


def test_head_bucket_tells_the_region_when_get_bucket_location_is_denied(s3):
    from botocore.awsrequest import AWSResponse

    def denied(**_):
        parsed = {
            "Error": {"Code": "AccessDenied", "Message": "Access Denied"},
            "ResponseMetadata": {"HTTPStatusCode": 403},
        }
        return AWSResponse("https://s3.amazonaws.com/", 403, {}, None), parsed

    s3.events.register("before-call.s3.GetBucketLocation", denied)
    assert locate("s3://corpus", aws_session=s3) == DataPlace("aws", "eu-central-1")


def test_a_lookup_that_cannot_be_made_is_said_with_what_was_assumed(s3, monkeypatch):
    said: list[str] = []
    assert locate_data(("s3://nosuch-bucket/x",), said.append, aws_session=s3) is None
    assert len(said) == 1 and "storage.data s3://nosuch-bucket: NoSuchBucket" in said[0]
    assert "assumed the data is wherever the cluster goes" in said[0]
    monkeypatch.setenv("MLCLOUD_OFFLINE", "1")
    said.clear()
    assert locate_data(("gs://eu-corpus/x",), said.append) is None
    assert "MLCLOUD_OFFLINE is set" in said[0] and "assumed" in said[0]
    with pytest.raises(UsageError, match="--near gs://eu-corpus: MLCLOUD_OFFLINE"):
        locate("gs://eu-corpus")  # asked for on the command line: refused, not assumed


def test_several_data_buckets_go_near_the_first(s3):
    said: list[str] = []
    place = locate_data(("s3://corpus/a", "s3://corpus/b"), said.append, aws_session=s3)
    assert place == DataPlace("aws", "eu-central-1")
    assert said == [
        "storage.data spans several buckets: compute goes near the first, s3://corpus/a"
    ]


def test_up_puts_compute_where_the_spec_data_is(aws_env, mlcloud_home, tmp_path, monkeypatch):
    """The real CLI: the plan follows storage.data (region from the cache, offline); without a
    terminal and without --yes it stops at the confirmation, nothing made."""
    (mlcloud_home / "cache").mkdir(parents=True)
    (mlcloud_home / "cache" / "buckets.json").write_text(
        json.dumps({"s3://corpus": {"region": "eu-west-1", "time": 4e9}})
    )
    monkeypatch.setenv("MLCLOUD_OFFLINE", "1")
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text("storage:\n  data: [s3://corpus/shards]\n")
    r = run_cli("up", "near", "-f", str(spec), "--provider", "aws", "--gpus", "A100:8")
    assert "data in eu-west-1: compute goes there (no egress)" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 2 and "--yes" in r.stderr
