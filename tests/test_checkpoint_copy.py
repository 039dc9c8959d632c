"""The cross-cloud checkpoint copy (mlcloud/jobs/checkpoint_copy.py): S3 in moto, Cloud Storage
in the fake GCE's JSON API, each bucket written and read by the node side's own code
(templates/checkpoints.py), so the layout is the one nodes use. The destination's manifest is
written last and only for files that match the source's."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys

import pytest
from moto import mock_aws

from mlcloud import templates
from mlcloud.jobs.checkpoint_copy import CheckpointCopyError, copy_newest

sys.path.insert(0, str(templates.ROOT))  # checkpoints.py imports send.py, as on a node
_spec = importlib.util.spec_from_file_location("checkpoints", templates.path("checkpoints.py"))
node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(node)
sys.path.remove(str(templates.ROOT))

S3_LOC = "s3://ckpt-us/runs/job"
GS_LOC = "gs://ckpt-eu/runs/job"


@pytest.fixture
def clouds(gce_env, aws_env):
    """An S3 bucket (moto, in-process) and a Cloud Storage bucket (the fake, reached as an
    emulator, with the user's key), both with the user's credentials."""
    gce_env.fake.create_bucket("ckpt-eu")
    with mock_aws():
        import boto3

        boto3.client("s3").create_bucket(Bucket="ckpt-us")
        yield gce_env.fake


def upload(uri: str, tmp_path, steps, size: int = 300_000, directory: bool = False) -> dict:
    """What a node does: each checkpoint written to disk, then uploaded by the node side."""
    src = tmp_path / "src"
    up = node.Uploader(node.open_store(uri, print), str(src), 0, print)
    out = {}
    for step in steps:
        data = hashlib.sha256(f"{uri}{step}".encode()).digest() * (size // 32)
        path = src / f"ckpt-{step}" / "model.pt" if directory else src / f"ckpt-{step}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if directory:
            (path.parent / "meta.json").write_text(json.dumps({"step": step}))
        out[step] = data
        first = up.poll()
        assert (first if first != "waiting" else up.poll()) == "uploaded"
    return out


def restored(uri: str, tmp_path, name: str) -> bytes | None:
    """What a new node does: restore the newest complete checkpoint by the manifest."""
    dest = tmp_path / f"restore-{len(list(tmp_path.iterdir()))}"
    step = node.restore(node.open_store(uri, print), str(dest), print)
    if step is None:
        return None
    path = dest / name
    return (path / "model.pt" if path.is_dir() else path).read_bytes()


@pytest.mark.parametrize(("src", "dst"), [(S3_LOC, GS_LOC), (GS_LOC, S3_LOC)])
def test_the_newest_checkpoint_moves_across_clouds(clouds, tmp_path, src, dst):
    written = upload(src, tmp_path, [10, 20])
    done = copy_newest(src, dst)
    assert (done.step, done.name, done.size, done.already) == (
        20,
        "ckpt-20.pt",
        len(written[20]),
        False,
    )
    assert restored(dst, tmp_path, "ckpt-20.pt") == written[20]
    assert copy_newest(src, dst).already  # nothing sent again
    # the next ones: the destination keeps the newest and the one before, as nodes do
    written |= upload(src, tmp_path, [30])
    copy_newest(src, dst)
    written |= upload(src, tmp_path, [40], directory=True)
    last = copy_newest(src, dst)
    assert last.name == "ckpt-40" and last.size > len(written[40])
    assert restored(dst, tmp_path, "ckpt-40") == written[40]
    manifest = json.loads(node.open_store(dst, print).get_bytes("latest.json"))
    assert (manifest["step"], manifest["copied_from"]) == (40, src)
    assert manifest["previous"]["files"][0][1:] == ["", len(written[30])] + [
        hashlib.sha256(written[30]).hexdigest()
    ]
    kept = (
        set(clouds.objects("ckpt-eu"))
        if dst.startswith("gs")
        else {o["Key"] for o in _s3_objects()}
    )
    assert len(kept) == 4  # the manifest, the newest's two files, the previous one


def _s3_objects():
    import boto3

    return boto3.client("s3").list_objects_v2(Bucket="ckpt-us").get("Contents", [])


def test_bytes_that_do_not_match_the_manifest_write_no_manifest(clouds, tmp_path):
    upload(S3_LOC, tmp_path, [5])
    first = copy_newest(S3_LOC, GS_LOC)
    written = upload(S3_LOC, tmp_path, [6], directory=True)
    manifest = json.loads(node.open_store(S3_LOC, print).get_bytes("latest.json"))
    model = next(f[0] for f in manifest["files"] if f[1] == "model.pt")
    import boto3

    boto3.client("s3").put_object(  # the object changed under its manifest
        Bucket="ckpt-us", Key=f"runs/job/{model}", Body=written[6][:-1] + b"x"
    )
    before = set(clouds.objects("ckpt-eu"))
    with pytest.raises(CheckpointCopyError) as info:
        copy_newest(S3_LOC, GS_LOC)
    message = str(info.value)
    assert "\n" not in message and "does not match its manifest" in message
    assert f"nothing written to {GS_LOC}/latest.json" in message
    dest = json.loads(clouds.storage.object_bytes("ckpt-eu", "runs/job/latest.json"))
    assert dest["step"] == 5 and dest["name"] == first.name  # still the old one, whole
    assert set(clouds.objects("ckpt-eu")) == before  # what it had sent is removed


def test_no_checkpoint_yet_and_bad_manifests(clouds, tmp_path):
    assert copy_newest(GS_LOC, S3_LOC) is None
    clouds.put_object("ckpt-eu", "runs/job/latest.json", "not json")
    with pytest.raises(CheckpointCopyError, match=r"latest.json is not JSON$"):
        copy_newest(GS_LOC, S3_LOC)
    clouds.put_object("ckpt-eu", "runs/job/latest.json", json.dumps({"step": 3}))
    with pytest.raises(CheckpointCopyError, match="is not a checkpoint manifest"):
        copy_newest(GS_LOC, S3_LOC)
    bad = {"step": 3, "name": "ckpt-3", "files": [["../../x", "", 1, "0"]]}
    clouds.put_object("ckpt-eu", "runs/job/latest.json", json.dumps(bad))
    with pytest.raises(CheckpointCopyError, match="names a bad object '../../x'"):
        copy_newest(GS_LOC, S3_LOC)
    gone = {"step": 3, "name": "ckpt-3.pt", "files": [["k/ckpt-3.pt", "", 1, "0"]]}
    clouds.put_object("ckpt-eu", "runs/job/latest.json", json.dumps(gone))
    with pytest.raises(CheckpointCopyError, match="which is not there"):
        copy_newest(GS_LOC, S3_LOC)
    assert _s3_objects() == []


def test_a_manifest_the_ddp_template_wrote_is_copied_too(clouds, tmp_path):
    """Before the node side, the DDP template wrote one object `key` with size and sha256."""
    data = b"weights" * 100
    clouds.put_object("ckpt-eu", "runs/job/ckpt-00000007-ab12.pt", data.decode())
    old = {"step": 7, "key": "ckpt-00000007-ab12.pt", "size": len(data)}
    old["sha256"] = hashlib.sha256(data).hexdigest()
    clouds.put_object("ckpt-eu", "runs/job/latest.json", json.dumps(old))
    assert copy_newest(GS_LOC, S3_LOC).step == 7
    assert restored(S3_LOC, tmp_path, "ckpt-00000007.pt") == data


def test_a_destination_out_of_reach_is_one_line(clouds, tmp_path):
    upload(GS_LOC, tmp_path, [1], size=64)
    with pytest.raises(CheckpointCopyError) as info:
        copy_newest(GS_LOC, "s3://no-such-bucket-x/runs/job")
    assert "\n" not in str(info.value) and "no-such-bucket-x" in str(info.value)
    clouds.revoke_credentials()  # the user's key no longer works at Google
    with pytest.raises(CheckpointCopyError, match=r"cannot read gs://ckpt-eu/runs/job/latest"):
        copy_newest(GS_LOC, S3_LOC)
