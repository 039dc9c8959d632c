"""The cross-cloud checkpoint copy (mlcloud/jobs/checkpoint_copy.py): S3 in moto, Cloud Storage
in the fake GCE's JSON API, each bucket written and read by the node side's own code
(templates/ddp/checkpoint_store.py), so the layout is the one nodes use. The destination's
manifest is written last and only for bytes that match the source's."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
from moto import mock_aws

from mlcloud import templates
from mlcloud.jobs.checkpoint_copy import CheckpointCopyError, copy_newest

_spec = importlib.util.spec_from_file_location(
    "checkpoint_store", templates.path("ddp/checkpoint_store.py")
)
node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(node)

S3_LOC = "s3://ckpt-us/runs/job"
GS_LOC = "gs://ckpt-eu/runs/job"


@pytest.fixture
def clouds(gce_env, aws_env, monkeypatch):
    """An S3 bucket (moto, in-process) and a Cloud Storage bucket (the fake, reached as an
    emulator with the user's key), both with the user's credentials."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gce_env.url)
    gce_env.fake.create_bucket("ckpt-eu")
    with mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="ckpt-us")
        yield gce_env.fake


def upload(uri: str, tmp_path, steps, size: int = 300_000) -> dict[int, bytes]:
    """What a node does: each checkpoint uploaded through the template's store."""
    said: list[str] = []
    store = node.open_store(uri, said.append)
    up = node.Uploader(store, said.append)
    out = {}
    for step in steps:
        path = tmp_path / f"ckpt-{step:08d}.pt"
        out[step] = hashlib.sha256(f"{uri}{step}".encode()).digest() * (size // 32)
        path.write_bytes(out[step])
        up.submit(step, str(path))
        with up._cond:
            while up._pending or up._busy:
                up._cond.wait()
    up.close()
    return out


def restored(uri: str, tmp_path) -> bytes | None:
    """What a new node does: fetch the newest complete checkpoint by the manifest."""
    dest = tmp_path / "restore"
    dest.mkdir(exist_ok=True)
    path = node.fetch_newest(node.open_store(uri, print), str(dest), print)
    return None if path is None else open(path, "rb").read()


@pytest.mark.parametrize(("src", "dst"), [(S3_LOC, GS_LOC), (GS_LOC, S3_LOC)])
def test_the_newest_checkpoint_moves_across_clouds(clouds, tmp_path, src, dst):
    written = upload(src, tmp_path, [10, 20])
    done = copy_newest(src, dst)
    assert (done.step, done.size, done.already) == (20, len(written[20]), False)
    assert restored(dst, tmp_path) == written[20]
    assert copy_newest(src, dst).already  # nothing sent again
    # the next ones: the destination keeps the newest and the one before, as nodes do
    written |= upload(src, tmp_path, [30])
    copy_newest(src, dst)
    written |= upload(src, tmp_path, [40])
    last = copy_newest(src, dst)
    assert restored(dst, tmp_path) == written[40]
    store = node.open_store(dst, print)
    manifest = store.manifest()
    assert (manifest["step"], manifest["key"], manifest["copied_from"]) == (40, last.key, src)
    kept = (
        set(clouds.objects("ckpt-eu"))
        if dst.startswith("gs")
        else {o["Key"] for o in _s3_objects()}
    )
    assert len(kept) == 3  # the manifest, the newest, the previous


def _s3_objects():
    import boto3

    return boto3.client("s3").list_objects_v2(Bucket="ckpt-us").get("Contents", [])


def test_bytes_that_do_not_match_the_manifest_write_no_manifest(clouds, tmp_path):
    upload(S3_LOC, tmp_path, [5])
    first = copy_newest(S3_LOC, GS_LOC)
    written = upload(S3_LOC, tmp_path, [6])
    manifest = json.loads(node.open_store(S3_LOC, print).get_bytes("latest.json"))
    import boto3

    boto3.client("s3").put_object(  # the object changed under its manifest
        Bucket="ckpt-us", Key=f"runs/job/{manifest['key']}", Body=written[6][:-1] + b"x"
    )
    with pytest.raises(CheckpointCopyError) as info:
        copy_newest(S3_LOC, GS_LOC)
    message = str(info.value)
    assert "\n" not in message and "does not match its manifest" in message
    assert f"nothing written to {GS_LOC}/latest.json" in message
    dest = json.loads(clouds.storage.object_bytes("ckpt-eu", "runs/job/latest.json"))
    assert dest["step"] == 5 and dest["key"] == first.key  # still the old one, whole


def test_no_checkpoint_yet_and_bad_manifests(clouds, tmp_path):
    assert copy_newest(GS_LOC, S3_LOC) is None
    clouds.put_object("ckpt-eu", "runs/job/latest.json", "not json")
    with pytest.raises(CheckpointCopyError, match=r"latest.json is not JSON$"):
        copy_newest(GS_LOC, S3_LOC)
    clouds.put_object("ckpt-eu", "runs/job/latest.json", json.dumps({"step": 3}))
    with pytest.raises(CheckpointCopyError, match="is not a checkpoint manifest"):
        copy_newest(GS_LOC, S3_LOC)
    bad = {"step": 3, "key": "../../x", "size": 1, "sha256": "0"}
    clouds.put_object("ckpt-eu", "runs/job/latest.json", json.dumps(bad))
    with pytest.raises(CheckpointCopyError, match="names a bad key"):
        copy_newest(GS_LOC, S3_LOC)
    gone = {"step": 3, "key": "ckpt-3.pt", "size": 1, "sha256": "0"}
    clouds.put_object("ckpt-eu", "runs/job/latest.json", json.dumps(gone))
    with pytest.raises(CheckpointCopyError, match="which is not there"):
        copy_newest(GS_LOC, S3_LOC)
    assert _s3_objects() == []


def test_a_destination_out_of_reach_is_one_line(clouds, tmp_path):
    upload(GS_LOC, tmp_path, [1])
    with pytest.raises(CheckpointCopyError) as info:
        copy_newest(GS_LOC, "s3://no-such-bucket-x/runs/job")
    assert "\n" not in str(info.value) and "no-such-bucket-x" in str(info.value)
    clouds.revoke_credentials()  # the user's key no longer works at Google
    with pytest.raises(CheckpointCopyError, match=r"cannot read gs://ckpt-eu/runs/job/latest"):
        copy_newest(GS_LOC, S3_LOC)
