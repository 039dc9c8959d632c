"""Bucket checkpoints end to end, against a plain moto server (EC2, IAM, S3) with instances
reached on loopback sshd nodes: `up` with `storage:` attaches the cluster's instance profile,
the node uploads the job's checkpoints to S3 (the DDP template's, and a plain script's that
knows nothing of buckets) and, its disk wiped, restores the newest before the job starts; the
user's own credentials reach no node; `down` removes the role and profile."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import boto3
import pytest
from conftest import relay_pool, run_cli

pytestmark = pytest.mark.e2e

CLIENT_KEY_ID = "AKIACLIENTONLY000001"
CLIENT_SECRET = "client-secret-never-on-a-node"


def test_checkpoints_go_to_the_bucket_and_a_wiped_node_resumes_from_it(
    moto_server, make_ssh_nodes, tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CLIENT_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CLIENT_SECRET)
    s3, iam = boto3.client("s3"), boto3.client("iam")
    s3.create_bucket(Bucket="ckpts")
    nodes = make_ssh_nodes(1)
    _, proxy = relay_pool(tmp_path, [nodes.nodes[0].host])
    assert run_cli("init", str(tmp_path / "proj")).returncode == 0
    spec = tmp_path / "proj" / "storage.yaml"
    spec.write_text(
        "workdir: .\n"
        "storage:\n  checkpoints: s3://ckpts/runs\n  data: [s3://ckpts/corpus]\n"
        "train: {script: train.py, nproc_per_node: 1}\n"
        # what the instance profile gives a real node, given here as the node's own keys
        f"envs:\n  AWS_ENDPOINT_URL: {moto_server}\n  AWS_ACCESS_KEY_ID: node-key\n"
        "  AWS_SECRET_ACCESS_KEY: node-secret\n  AWS_DEFAULT_REGION: us-east-1\n"
        "  AWS_EC2_METADATA_DISABLED: 'true'\n"
    )
    r = run_cli(
        "up", "st", "-f", str(spec), "--provider", "aws", "--instance-type", "g5.xlarge",
        "--identity", str(nodes.client_key), "--ssh-user", nodes.user,
        "--ssh-port", str(nodes.port), "--proxy-command", proxy,
        "--allow-ssh-from", "127.0.0.1/32", "--yes", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    uid, node_id = c["uid"], c["nodes"][0]["id"]
    (reservation,) = boto3.client("ec2").describe_instances(InstanceIds=[node_id])["Reservations"]
    assert reservation["Instances"][0]["IamInstanceProfile"]["Arn"].endswith(f"/mlcloud-{uid}")
    policy = iam.get_role_policy(RoleName=f"mlcloud-{uid}", PolicyName="mlcloud-storage")
    assert {s["Resource"] for s in policy["PolicyDocument"]["Statement"]} == {
        "arn:aws:s3:::ckpts",
        "arn:aws:s3:::ckpts/runs/*",
        "arn:aws:s3:::ckpts/corpus/*",
    }

    r = run_cli("train", "st", "-f", str(spec), "--", "--steps", "4", "--ckpt-every", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert "checkpoints: step 4 uploaded to s3://ckpts/runs/st" in r.stdout, r.stdout[-3000:]
    manifest = json.loads(s3.get_object(Bucket="ckpts", Key="runs/st/latest.json")["Body"].read())
    assert manifest["step"] == 4

    from mlcloud import state

    (node,) = state.open_store().get_cluster("st").nodes
    root = Path(node.root.replace("~", str(Path.home()), 1))  # ~/.mlcloud/UID/node-K
    shutil.rmtree(root / "checkpoints")  # a replacement node: nothing on its disk
    r = run_cli("train", "st", "-f", str(spec), "--", "--steps", "6", "--ckpt-every", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert "checkpoints: restored step 4 from s3://ckpts/runs/st" in r.stdout, r.stdout[-3000:]
    assert re.search(r"resumed from step 4\b", r.stdout) and "done steps=6" in r.stdout

    # the node has only its own keys: nothing of the launching machine's
    job = json.loads(next(root.glob("jobs/2/job.json")).read_text())
    assert job["env"]["MLCLOUD_CHECKPOINT_URI"] == "s3://ckpts/runs/st"
    assert job["env"]["AWS_ACCESS_KEY_ID"] == "node-key"
    for f in (Path.home() / ".mlcloud" / uid).rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert CLIENT_KEY_ID.encode() not in data and CLIENT_SECRET.encode() not in data, f

    assert run_cli("down", "st", "--yes").returncode == 0
    assert iam.list_roles(PathPrefix="/mlcloud/")["Roles"] == []
    assert iam.list_instance_profiles(PathPrefix="/mlcloud/")["InstanceProfiles"] == []


PLAIN = """
import json, os, sys, time
d = os.environ["MLCLOUD_CHECKPOINT_DIR"]
have = [int(n[5:-5]) for n in os.listdir(d) if n.startswith("ckpt-") and n.endswith(".json")]
start = max(have, default=0)
print(f"resumed from step {start}", flush=True)
for step in range(start + 1, int(sys.argv[1]) + 1):
    tmp = os.path.join(d, f".ckpt-{step}.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step, "sum": sum(range(step + 1))}, f)
    os.replace(tmp, os.path.join(d, f"ckpt-{step}.json"))
print(f"done steps={sys.argv[1]}", flush=True)
"""


def test_a_plain_script_resumes_from_the_bucket_on_a_wiped_node(
    moto_server, make_ssh_nodes, tmp_path, monkeypatch
):
    """Nothing in the script knows of buckets: the node uploads what it writes into
    MLCLOUD_CHECKPOINT_DIR, and restores the newest into an empty one before it starts."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="plain")
    nodes = make_ssh_nodes(1)
    _, proxy = relay_pool(tmp_path, [nodes.nodes[0].host])
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "plain.py").write_text(PLAIN)
    spec = proj / "mlcloud.yaml"
    spec.write_text(
        "workdir: .\n"
        "storage:\n  checkpoints: s3://plain/runs\n"
        "train: {script: plain.py, nproc_per_node: 1}\n"
        f"envs:\n  AWS_ENDPOINT_URL: {moto_server}\n  AWS_ACCESS_KEY_ID: node-key\n"
        "  AWS_SECRET_ACCESS_KEY: node-secret\n  AWS_DEFAULT_REGION: us-east-1\n"
        "  AWS_EC2_METADATA_DISABLED: 'true'\n"
    )
    r = run_cli(
        "up", "pl", "-f", str(spec), "--provider", "aws", "--instance-type", "g5.xlarge",
        "--identity", str(nodes.client_key), "--ssh-user", nodes.user,
        "--ssh-port", str(nodes.port), "--proxy-command", proxy,
        "--allow-ssh-from", "127.0.0.1/32", "--yes",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "pl", "-f", str(spec), "plain.py", "3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert "resumed from step 0" in r.stdout and "done steps=3" in r.stdout
    assert "checkpoints: step 3 uploaded to s3://plain/runs/pl" in r.stdout, r.stdout[-3000:]
    manifest = json.loads(s3.get_object(Bucket="plain", Key="runs/pl/latest.json")["Body"].read())
    assert (manifest["step"], manifest["name"]) == (3, "ckpt-3.json")

    from mlcloud import state

    (node,) = state.open_store().get_cluster("pl").nodes
    root = Path(node.root.replace("~", str(Path.home()), 1))
    shutil.rmtree(root / "checkpoints")  # a replacement node: nothing on its disk
    r = run_cli("train", "pl", "-f", str(spec), "plain.py", "5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    lines = r.stdout.splitlines()
    restored = next(
        i for i, x in enumerate(lines) if "restored step 3 from s3://plain/runs/pl" in x
    )
    resumed = next(i for i, x in enumerate(lines) if "resumed from step 3" in x)
    assert restored < resumed, r.stdout[-3000:]  # restored before the job's processes started
    assert json.loads((root / "checkpoints" / "ckpt-3.json").read_text()) == {"step": 3, "sum": 6}
    assert "checkpoints: step 5 uploaded to s3://plain/runs/pl" in r.stdout
    assert run_cli("down", "pl", "--yes").returncode == 0
