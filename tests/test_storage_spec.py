"""Spec `storage:`: bucket URIs are checked (scheme, each cloud's bucket naming rules, prefix)
and refused one value at a time, in one line naming the file, line and field."""

from __future__ import annotations

import json

import pytest

from mlcloud.errors import UsageError
from mlcloud.spec import buckets
from mlcloud.spec.task import StorageSpec, TaskSpec, load_spec


def load(tmp_path, text):
    path = tmp_path / "mlcloud.yaml"
    path.write_text(text)
    return load_spec(path)


def test_storage_loads_in_canonical_form_and_round_trips(tmp_path):
    spec = load(
        tmp_path,
        "name: t\nstorage:\n  checkpoints: s3://my-ckpts/runs/llm/\n"
        "  data: [gs://corpus_eu/shards, s3://my.data/x, s3://my.data/x/]\n",
    )
    assert spec.storage == StorageSpec(
        checkpoints="s3://my-ckpts/runs/llm", data=("gs://corpus_eu/shards", "s3://my.data/x")
    )
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert load(tmp_path, "storage:\n  data: s3://one\n").storage.data == ("s3://one",)
    assert TaskSpec.from_dict({}).storage == StorageSpec()  # a cluster stored before storage:


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("ftp://bucket/x", "not a bucket URI"),
        ("my-bucket/x", "not a bucket URI"),
        ("s3:///x", "no bucket name"),
        ("s3://My_Bucket/x", "S3 bucket names are 3-63"),
        ("s3://ab", "S3 bucket names are 3-63"),
        ("s3://" + "a" * 64, "S3 bucket names are 3-63"),
        ("s3://-bucket", "S3 bucket names"),
        ("s3://a..b", "two dots"),
        ("s3://192.168.5.4", "IP address"),
        ("s3://xn--bucket", "reserves"),
        ("s3://bucket-s3alias", "reserves"),
        ("gs://Bucket", "Cloud Storage bucket names"),
        ("gs://google-data", "google"),
        ("gs://goog-data", "`goog` first"),
        ("gs://" + "a" * 64, "Cloud Storage bucket names"),
        ("s3://bucket/a//b", "empty path segment"),
        ("s3://bucket/runs/*", "`*`"),
        ("s3://bucket/${aws:username}", "`$`"),
        ("s3://bucket/a/../b", "`..`"),
    ],
)
def test_bad_checkpoint_uris_are_refused_in_one_line(tmp_path, value, words):
    with pytest.raises(UsageError) as info:
        load(tmp_path, f"name: t\nstorage:\n  checkpoints: {value!r}\n")
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert message.startswith(f"{tmp_path / 'mlcloud.yaml'}:3: storage.checkpoints: ")
    assert repr(value) in message and words in message


def test_each_data_value_is_checked(tmp_path):
    with pytest.raises(UsageError, match=r":2: storage.data: 's3://Bad' bucket name"):
        load(tmp_path, "storage:\n  data: [s3://good, s3://Bad]\n")
    with pytest.raises(UsageError, match=r"storage.data: must be a list of bucket URIs"):
        load(tmp_path, "storage:\n  data: {a: 1}\n")
    with pytest.raises(UsageError, match=r"storage.data: must be a bucket URI.*got a number"):
        load(tmp_path, "storage:\n  data: [3]\n")
    with pytest.raises(UsageError, match=r"storage.bucket: unknown field"):
        load(tmp_path, "storage:\n  bucket: s3://x\n")


def test_long_gcs_names_need_dots():
    name = ".".join(["a" * 60] * 3)
    assert buckets.parse(f"gs://{name}/p").bucket == name
    assert buckets.parse("s3://bkt").child("c/d") == buckets.BucketUri("s3", "bkt", "c/d")
    assert str(buckets.parse("gs://bkt/").child("run")) == "gs://bkt/run"


def test_each_scheme_names_the_provider_that_serves_it():
    """gs:// is served by the `gce` provider (GCP is the cloud, not a provider name)."""
    from mlcloud import providers

    assert buckets.SCHEMES == {"s3": "aws", "gs": "gce"}
    assert set(buckets.SCHEMES.values()) <= set(providers.names())


def _handle(spec: dict):
    from types import SimpleNamespace

    from mlcloud import state
    from mlcloud.provision.handle import Handle

    node = state.NodeRecord(0, "i-1", "10.0.0.1", "10.0.0.1", "/r/n0", 0, None, "running", "py")
    rec = state.ClusterRecord("lab", "lab-1", "aws", "UP", spec, "o", 0, 0, (node,))
    return Handle(rec, None, None, [SimpleNamespace(python="py")])


def test_the_job_gets_the_checkpoint_uri_and_none_of_the_callers_credentials(monkeypatch):
    from pathlib import Path

    from mlcloud.jobs import launch

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, "client-secret")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/home/me/key.json")
    req = launch.JobRequest(Path("."), "train.py", (), None, {"WANDB_MODE": "off"}, None, None)
    spec = TaskSpec(storage=StorageSpec(checkpoints="s3://ckpts/runs")).to_dict()
    job = launch.node_job(_handle(spec), req, 1, 0, 29500, 1)
    assert job["env"]["MLCLOUD_CHECKPOINT_URI"] == "s3://ckpts/runs/lab"
    assert "client-secret" not in json.dumps(job) and "key.json" not in json.dumps(job)
    assert not [k for k in job["env"] if k.startswith(("AWS_", "GOOGLE_"))]
    job = launch.node_job(_handle(TaskSpec().to_dict()), req, 1, 0, 29500, 1)
    assert "MLCLOUD_CHECKPOINT_URI" not in job["env"]


def test_checkpoints_per_cloud_load_round_trip_and_give_each_cloud_its_location(tmp_path):
    spec = load(
        tmp_path,
        "name: t\nstorage:\n  checkpoints:\n    gce: gs://ck-eu/runs/\n    aws: s3://ck-us/runs\n",
    )
    assert spec.storage.checkpoints == {"aws": "s3://ck-us/runs", "gce": "gs://ck-eu/runs"}
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert buckets.checkpoint_location(spec, "aws", "job") == "s3://ck-us/runs/job"
    assert buckets.checkpoint_location(spec.to_dict(), "gce", "job") == "gs://ck-eu/runs/job"
    assert buckets.checkpoint_location(spec, "ssh", "job") is None
    one = TaskSpec(storage=StorageSpec(checkpoints="s3://ckb/r"))
    assert buckets.checkpoint_location(one, "gce", "j") == "s3://ckb/r/j"  # one for every cloud
    assert buckets.checkpoint_location(TaskSpec(), "aws", "j") is None
    aws_only = load(tmp_path, "storage:\n  checkpoints: {aws: s3://ck-us/r}\n")
    assert buckets.checkpoint_location(aws_only, "gce", "j") is None


@pytest.mark.parametrize(
    ("value", "field", "words"),
    [
        ("{}", "storage.checkpoints", "an empty mapping"),
        ("{azure: s3://ckb}", "storage.checkpoints.azure", "unknown cloud 'azure'"),
        ("{ssh: s3://ckb}", "storage.checkpoints.ssh", "the clouds with buckets are aws, gce"),
        (
            "{aws: gs://ckb}",
            "storage.checkpoints.aws",
            "'gs://ckb' is another cloud's bucket: write s3://",
        ),
        ("{gce: s3://ck-x/r}", "storage.checkpoints.gce", "write gs://BUCKET/PREFIX (gce nodes"),
        ("{gce: gs://Bad}", "storage.checkpoints.gce", "Cloud Storage bucket names"),
        ("{gce: 3}", "storage.checkpoints.gce", "got a number"),
        ("{gce: ''}", "storage.checkpoints.gce", "got text"),
        ("[s3://ckb]", "storage.checkpoints", "or one per cloud like {aws:"),
        ("7", "storage.checkpoints", "got a number"),
    ],
)
def test_bad_checkpoint_mappings_are_refused_in_one_line(tmp_path, value, field, words):
    with pytest.raises(UsageError) as info:
        load(tmp_path, f"name: t\nstorage:\n  checkpoints: {value}\n")
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    assert message.startswith(f"{tmp_path / 'mlcloud.yaml'}:3: {field}: "), message
    assert words in message, message


def test_the_job_gets_its_clouds_checkpoint_location():
    from pathlib import Path

    from mlcloud.jobs import launch

    req = launch.JobRequest(Path("."), "train.py", (), None, {}, None, None)
    both = {"aws": "s3://ck-us/runs", "gce": "gs://ck-eu/runs"}
    spec = TaskSpec(storage=StorageSpec(checkpoints=both)).to_dict()
    job = launch.node_job(_handle(spec), req, 1, 0, 29500, 1)  # an aws cluster
    assert job["env"]["MLCLOUD_CHECKPOINT_URI"] == "s3://ck-us/runs/lab"


def test_a_cluster_is_granted_its_own_clouds_checkpoint_location():
    """`up` asks the provider for credentials to the location its nodes use, not the other's."""
    from mlcloud.provision.lifecycle import request_for

    both = {"aws": "s3://ck-us/runs", "gce": "gs://ck-eu/runs"}
    storage = StorageSpec(checkpoints=both, data=("gs://corpus-eu/x",))
    gce = request_for(TaskSpec(provider="gce", storage=storage), 1).storage
    assert (gce.write, gce.read) == (("gs://ck-eu/runs",), ("gs://corpus-eu/x",))
    aws = request_for(TaskSpec(provider="aws", storage=storage), 1).storage
    assert aws.write == ("s3://ck-us/runs",)
    one = request_for(TaskSpec(provider="gce", storage=StorageSpec(checkpoints="gs://ck/r")), 1)
    assert one.storage.write == ("gs://ck/r",)
    ssh = request_for(TaskSpec(provider="ssh", storage=StorageSpec(checkpoints=both)), 1)
    assert ssh.storage.write == ()
