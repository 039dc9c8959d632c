"""A managed job on EC2, end to end (issue 20's acceptance): a plain moto server (EC2, IAM,
S3) behind the ClientToken stand-in, instances reached on loopback sshd nodes by a relay. A
script that knows nothing of buckets writes ckpt-<step>.json files; its only node is reclaimed
mid-run (the instance terminated in moto, its sshd killed); the job comes back on a new
instance of a new cluster, restored from the bucket (the new node's disk is empty), loses at
most one checkpoint interval, finishes, and leaves nothing running."""

from __future__ import annotations

import json
import time

import boto3
import pytest
from conftest import cli_process, relay_pool, relayed_node_args, run_cli
from test_aws_cli import live_instances, mlcloud_resources
from test_aws_elastic import lose

pytestmark = pytest.mark.e2e

# resumes after the newest checkpoint on its disk, writes one per step (whole, then renamed);
# from step 6 on it waits for $GATE, so the test reclaims its node mid-run
JOB = """\
import glob, json, os, time
d = os.environ["MLCLOUD_CHECKPOINT_DIR"]
os.makedirs(d, exist_ok=True)
have = [int(p.rsplit("-", 1)[1].split(".")[0]) for p in glob.glob(os.path.join(d, "ckpt-*.json"))]
start = max(have, default=0)
print(f"resumed from step {start}", flush=True)
for step in range(start + 1, 11):
    while step > 5 and not os.path.exists(os.environ["GATE"]):
        time.sleep(0.05)
    tmp = os.path.join(d, f".ckpt-{step}.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
    os.replace(tmp, os.path.join(d, f"ckpt-{step}.json"))
    print(f"step {step}", flush=True)
    time.sleep(0.2)
print("done", flush=True)
"""


def _latest(s3) -> int:
    try:
        body = s3.get_object(Bucket="ckpts", Key="runs/rc/latest.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return 0
    return json.loads(body)["step"]


def test_a_reclaimed_node_comes_back_on_a_new_cluster_from_the_bucket(
    moto_server, ec2_stand_in, make_ssh_nodes, tmp_path
):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="ckpts")
    nodes = make_ssh_nodes(2)  # one for rc-1, one for the instance of rc-2
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    project = tmp_path / "proj"
    project.mkdir()
    (project / "job.py").write_text(JOB)
    gate = tmp_path / "gate"
    spec = project / "mlcloud.yaml"
    spec.write_text(
        "workdir: .\nprovider: aws\nresources: {instance_type: g5.xlarge}\n"
        "storage: {checkpoints: 's3://ckpts/runs'}\n"
        "recover: {placements: ['aws:us-east-1']}\n"
        # what the instance profile gives a real node, given here as the node's own keys
        f"envs:\n  AWS_ENDPOINT_URL: {moto_server}\n  AWS_ACCESS_KEY_ID: node-key\n"
        "  AWS_SECRET_ACCESS_KEY: node-secret\n  AWS_DEFAULT_REGION: us-east-1\n"
        "  AWS_EC2_METADATA_DISABLED: 'true'\n"
    )
    launch = cli_process(
        ["launch", "rc", "-f", str(spec), *relayed_node_args(nodes, proxy),
         "-e", f"GATE={gate}", "--yes", "job.py"],
        tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while _latest(s3) < 5:  # step 5 is in the bucket: the job waits at the gate
            assert launch.poll() is None, launch.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.2)
        from mlcloud import state

        (node,) = state.open_store().get_cluster("rc-1").nodes
        lose(node.node_id)  # a Spot reclaim: the instance and its machine go at once
        nodes.kill(0)
        deadline = time.monotonic() + 180
        while state.open_store().get_cluster("rc-2") is None:
            assert launch.poll() is None, launch.communicate()[0]
            assert time.monotonic() < deadline, "no new cluster"
            time.sleep(0.2)
        gate.touch()
        out, _ = launch.communicate(timeout=240)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    assert launch.returncode == 0, out[-4000:]
    assert "checkpoints: restored step 5 from s3://ckpts/runs/rc" in out, out[-4000:]
    assert "resumed from step 5" in out and "done" in out
    r = run_cli("jobs", "--json")
    (job,) = json.loads(r.stdout)["jobs"]
    assert (job["status"], job["restarts"], job["steps_lost"]) == ("SUCCEEDED", 1, 0)
    assert [(c["cluster"], c["where"].split(":")[0], c["why"]) for c in job["clusters"]] == [
        ("rc-1", "aws", "every node lost"),
        ("rc-2", "aws", "job ended"),
    ]
    assert mlcloud_resources() == {"instances": 0, "security_groups": 0, "key_pairs": 0}
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []


def test_cancel_while_the_new_cluster_is_made_leaves_nothing(
    moto_server, ec2_stand_in, make_ssh_nodes, tmp_path
):
    nodes = make_ssh_nodes(1)  # rc-1's only: the instance of the new cluster never answers
    _, proxy = relay_pool(tmp_path, [nodes.nodes[0].host])
    project = tmp_path / "proj"
    project.mkdir()
    (project / "job.py").write_text(JOB)
    spec = project / "mlcloud.yaml"
    spec.write_text("workdir: .\nprovider: aws\nresources: {instance_type: g5.xlarge}\n")
    launch = cli_process(
        ["launch", "cx", "-f", str(spec), *relayed_node_args(nodes, proxy),
         "-e", f"GATE={tmp_path / 'never'}", "--yes", "job.py"],
        tmp_path,
    )  # fmt: skip
    from mlcloud import state

    try:
        deadline = time.monotonic() + 180
        while not any(j.status == "RUNNING" for j in state.open_store().jobs("cx-1")):
            assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()[0]
            time.sleep(0.2)
        (node,) = state.open_store().get_cluster("cx-1").nodes
        lose(node.node_id)
        nodes.kill(0)
        while len(live := live_instances()) == 0:  # cx-2's instance: bootstrapping
            assert launch.poll() is None and time.monotonic() < deadline, launch.communicate()[0]
            time.sleep(0.2)
        r = run_cli("cancel", "cx", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        out, _ = launch.communicate(timeout=120)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    assert launch.returncode == 130, out[-4000:]
    assert live and mlcloud_resources() == {"instances": 0, "security_groups": 0, "key_pairs": 0}
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
    (job,) = json.loads(run_cli("jobs", "--json").stdout)["jobs"]
    assert job["status"] == "CANCELLED"
