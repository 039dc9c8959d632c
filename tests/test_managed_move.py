"""Managed jobs, rung 3: the move for price, end to end with the real `mlcloud launch` (the
torchrun stand-in) on loopback sshd nodes reached through a relay, EC2 behind the moto stand-in
(its set_spot_price) and the fake Compute API with its Cloud Storage (STORAGE_EMULATOR_HOST).

An EC2 Spot spike moves the job to GCE: the newest checkpoint is copied from S3 to Cloud
Storage and verified, the job resumes there from it, the EC2 cluster is retired (`moved`) and
nothing is left. A copy that fails verification keeps the job where it was (the new cluster
torn down); `cancel` during a move leaves neither cluster; a price that is not live never
moves a job."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import boto3
import pytest
from conftest import MLCLOUD, relay_pool, relayed_node_args, run_cli
from conftest import wait_for as _wait_for
from test_aws_cli import live_instances

pytestmark = pytest.mark.e2e

NAME = "xc"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d", "us-east-1e", "us-east-1f")

# resumes after its newest ckpt-<step>.json, writes one every 4 steps (2 s: the node side
# uploads a checkpoint once two looks a second apart saw it unchanged) up to $LAST_CKPT, ends
# once $GATE exists

wait_for = functools.partial(_wait_for, timeout=120.0, every=0.2)

JOB = """\
import json, os, time
d = os.environ["MLCLOUD_CHECKPOINT_DIR"]
os.makedirs(d, exist_ok=True)
have = [int(n[5:-5]) for n in os.listdir(d) if n.startswith("ckpt-") and n.endswith(".json")]
step = max(have) + 1 if have else 0
first = step
while not os.path.exists(os.environ["GATE"]):
    print(f"step {step}", flush=True)
    if step % 4 == 0 and step <= int(os.environ.get("LAST_CKPT", "1000000")):
        tmp = os.path.join(d, f".ckpt-{step}.tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step}, f)
        os.rename(tmp, os.path.join(d, f"ckpt-{step}.json"))
    step += 1
    time.sleep(0.5)
out = os.environ["MLCLOUD_OUTPUT_DIR"]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "first_step.txt"), "w").write(str(first))
"""


class Launch:
    """`mlcloud launch` as a process, its output collected as it comes."""

    def __init__(self, argv: list[str], env: dict, cwd: Path):
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, env=env, cwd=cwd,
        )  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float = 180) -> int:
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launch did not end in {timeout} s: {self.out}") from None
        self.reader.join(timeout=10)
        return code


@pytest.fixture
def clouds(moto_server, ec2_stand_in, gce_env, monkeypatch):
    """Both fakes priced so EC2 Spot is the cheapest, buckets on both, moves checked often."""
    monkeypatch.setenv("MLCLOUD_GCE_BILLING_ENDPOINT", gce_env.url)
    monkeypatch.setenv("MLCLOUD_MOVE_CHECK_EVERY", "1")
    monkeypatch.setenv("MLCLOUD_MOVE_PRICE_MAX_AGE", "4")
    monkeypatch.setenv("MLCLOUD_MOVE_CHECKPOINT_WAIT", "30")
    for zone in ZONES:
        ec2_stand_in.set_spot_price(zone, "g4dn.xlarge", 0.05)
    boto3.client("s3").create_bucket(Bucket="ckpts")
    gce_env.fake.create_bucket("ckpts-gce")
    return ec2_stand_in, gce_env


def project(tmp_path: Path, moto_url: str, gce_url: str) -> Path:
    p = tmp_path / "proj"
    p.mkdir(exist_ok=True)
    (p / "job.py").write_text(JOB)
    (p / "mlcloud.yaml").write_text(
        "workdir: .\nprovider: aws\nspot: true\n"
        "resources: {instance_type: g4dn.xlarge}\n"
        "storage:\n  checkpoints: {aws: 's3://ckpts/runs', gce: 'gs://ckpts-gce/runs'}\n"
        "recover: {placements: ['aws:us-east-1', 'gce:us-central1']}\n"
        "train: {script: job.py, nproc_per_node: 1}\n"
        # what the instance profile and the service account give real nodes, given here
        f"envs:\n  AWS_ENDPOINT_URL: {moto_url}\n  AWS_ACCESS_KEY_ID: node-key\n"
        "  AWS_SECRET_ACCESS_KEY: node-secret\n  AWS_DEFAULT_REGION: us-east-1\n"
        f"  AWS_EC2_METADATA_DISABLED: 'true'\n  STORAGE_EMULATOR_HOST: {gce_url}\n"
    )
    return p


def launch(
    tmp_path: Path, nodes, gate: Path, moto_url: str, gce_url: str, last_ckpt: int = 1000000
) -> Launch:
    proj = project(tmp_path, moto_url, gce_url)
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    argv = [
        MLCLOUD, "launch", NAME, "-f", str(proj / "mlcloud.yaml"), "--yes", "-e", "GATE",
        "-e", "LAST_CKPT", *relayed_node_args(nodes, proxy),
    ]  # fmt: skip
    return Launch(argv, dict(os.environ, GATE=str(gate), LAST_CKPT=str(last_ckpt)), tmp_path)


def status() -> dict[str, dict]:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return {c["name"]: c for c in json.loads(r.stdout)["clusters"]}


def running(name: str) -> bool:
    c = status().get(name)
    return bool(c and c["jobs"] and c["jobs"][-1]["status"] == "RUNNING")


def job() -> dict:
    r = run_cli("jobs", "--json")
    assert r.returncode == 0, r.stderr
    return {j["name"]: j for j in json.loads(r.stdout)["jobs"]}[NAME]


def events() -> str:
    r = run_cli("events", NAME)
    assert r.returncode == 0, r.stderr
    return r.stdout


def s3_step() -> int | None:
    try:
        body = boto3.client("s3").get_object(Bucket="ckpts", Key=f"runs/{NAME}/latest.json")
    except boto3.client("s3").exceptions.NoSuchKey:
        return None
    return json.loads(body["Body"].read())["step"]


def spike(ec2_stand_in) -> None:
    for zone in ZONES:
        ec2_stand_in.set_spot_price(zone, "g4dn.xlarge", 3.0)


def nothing_left(gce_fake) -> None:
    assert status() == {}
    assert live_instances() == []
    assert gce_fake.instances() == []


def test_an_ec2_spot_spike_moves_the_job_to_gce_with_its_checkpoint_copied(
    clouds, make_ssh_nodes, tmp_path
):
    ec2_stand_in, gce_env = clouds
    nodes = make_ssh_nodes(2)  # the EC2 instance, then the GCE VM
    gate = tmp_path / "gate"
    p = launch(tmp_path, nodes, gate, os.environ["AWS_ENDPOINT_URL"], gce_env.url)
    try:
        wait_for(lambda: running(f"{NAME}-1") or p.p.poll() is not None, what="the job on EC2")
        assert status()[f"{NAME}-1"]["provider"] == "aws", p.out
        wait_for(lambda: (s3_step() or 0) >= 4, what="checkpoints in S3", out=lambda: p.out)
        spike(ec2_stand_in)
        wait_for(lambda: "checkpoints: restored step" in p.out or p.p.poll() is not None,
                 timeout=240, what="the job restored on GCE", out=lambda: p.out)  # fmt: skip
        assert p.p.poll() is None, p.out
        gate.touch()
        assert p.wait() == 0, p.out
    finally:
        p.p.kill()
    j = job()
    assert (j["status"], j["restarts"]) == ("SUCCEEDED", 1), j
    assert [(c["cluster"], c["why"]) for c in j["clusters"]] == [
        (f"{NAME}-1", "moved"),
        (f"{NAME}-2", "job ended"),
    ], j
    assert j["clusters"][1]["where"].startswith("gce:us-central1"), j
    said = events()
    assert "move: gce:us-central1" in said and "$3.00/h" in said, said
    copied = [line for line in said.splitlines() if "copied from s3://ckpts/runs/xc" in line]
    assert len(copied) == 1 and "to gs://ckpts-gce/runs/xc" in copied[0], said
    assert "verified" in copied[0] and "moved" in said
    step = int(copied[0].split("checkpoint step ")[1].split()[0])
    assert f"checkpoints: restored step {step} from gs://ckpts-gce/runs/xc" in p.out, p.out
    assert f"ckpts-gce/runs/{NAME}/latest.json" in gce_env.fake.objects("ckpts-gce")
    first = tmp_path / "mlcloud-results" / NAME / f"{NAME}-2" / "node0" / "first_step.txt"
    assert int(first.read_text()) == step + 1  # resumed after the copied checkpoint
    nothing_left(gce_env.fake)


def test_a_checkpoint_that_fails_verification_keeps_the_job_where_it_was(
    clouds, make_ssh_nodes, tmp_path, monkeypatch
):
    ec2_stand_in, gce_env = clouds
    # no checkpoint comes after step 4: the move goes with that one once this wait is out
    monkeypatch.setenv("MLCLOUD_MOVE_CHECKPOINT_WAIT", "8")
    nodes = make_ssh_nodes(2)
    gate = tmp_path / "gate"
    p = launch(tmp_path, nodes, gate, os.environ["AWS_ENDPOINT_URL"], gce_env.url, last_ckpt=4)
    try:
        wait_for(lambda: s3_step() == 4, what="the last checkpoint in S3", out=lambda: p.out)
        s3 = boto3.client("s3")
        manifest = json.loads(
            s3.get_object(Bucket="ckpts", Key=f"runs/{NAME}/latest.json")["Body"].read()
        )
        ((obj, *_),) = manifest["files"]
        s3.put_object(Bucket="ckpts", Key=f"runs/{NAME}/{obj}", Body=b"changed under its manifest")
        spike(ec2_stand_in)
        wait_for(lambda: "move aborted" in events() or p.p.poll() is not None,
                 timeout=180, what="the copy refused", out=lambda: p.out)  # fmt: skip
        wait_for(lambda: f"{NAME}-2" not in status(), what=f"{NAME}-2 torn down")
        assert running(f"{NAME}-1"), p.out
        gate.touch()
        assert p.wait() == 0, p.out
    finally:
        p.p.kill()
    said = events()
    assert "does not match its manifest" in said and f"the job stays on {NAME}-1" in said, said
    j = job()
    assert (j["status"], j["restarts"]) == ("SUCCEEDED", 0), j
    assert [(c["cluster"], c["why"]) for c in j["clusters"]] == [
        (f"{NAME}-1", "job ended"),
        (f"{NAME}-2", "move: the copy failed"),
    ], j
    assert not any(o.endswith("latest.json") for o in gce_env.fake.objects("ckpts-gce"))
    nothing_left(gce_env.fake)


def test_cancel_during_a_move_leaves_neither_cluster(clouds, make_ssh_nodes, tmp_path):
    ec2_stand_in, gce_env = clouds
    nodes = make_ssh_nodes(2)
    gate = tmp_path / "gate"
    p = launch(tmp_path, nodes, gate, os.environ["AWS_ENDPOINT_URL"], gce_env.url)
    try:
        wait_for(lambda: (s3_step() or 0) >= 4, what="checkpoints in S3", out=lambda: p.out)
        spike(ec2_stand_in)
        wait_for(lambda: f"{NAME}-2" in status() or p.p.poll() is not None,
                 timeout=180, what=f"{NAME}-2 being made", out=lambda: p.out)  # fmt: skip
        r = run_cli("cancel", NAME, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        code = p.wait()
    finally:
        p.p.kill()
    assert code == 130, p.out
    j = job()
    assert j["status"] == "CANCELLED", j
    assert all(c["to"] for c in j["clusters"]), j  # every cluster it made has ended
    nothing_left(gce_env.fake)


def test_a_price_that_is_not_live_never_moves_the_job(
    clouds, make_ssh_nodes, tmp_path, monkeypatch
):
    from mlcloud.spec import offers
    from mlcloud.spec.task import load_spec

    ec2_stand_in, gce_env = clouds
    proj = project(tmp_path, os.environ["AWS_ENDPOINT_URL"], gce_env.url)
    spec = load_spec(proj / "mlcloud.yaml")
    hour_ago = time.time() - 3600  # GCE's price read an hour ago, then its API out of reach
    offers.offers(spec, ["gce:us-central1"], now=hour_ago, max_age=60)
    monkeypatch.setenv("MLCLOUD_GCE_BILLING_ENDPOINT", "http://127.0.0.1:9")
    nodes = make_ssh_nodes(1)
    gate = tmp_path / "gate"
    p = launch(tmp_path, nodes, gate, os.environ["AWS_ENDPOINT_URL"], gce_env.url)
    try:
        wait_for(lambda: running(f"{NAME}-1") or p.p.poll() is not None, what="the job on EC2")
        spike(ec2_stand_in)
        wait_for(lambda: "is stale" in events() or p.p.poll() is not None,
                 what="the stale price seen", out=lambda: p.out)  # fmt: skip
        assert running(f"{NAME}-1") and f"{NAME}-2" not in status(), p.out
        gate.touch()
        assert p.wait() == 0, p.out
    finally:
        p.p.kill()
    said = events()
    assert "no move: the best price (gce:us-central1) is stale" in said, said
    j = job()
    assert [(c["cluster"], c["why"]) for c in j["clusters"]] == [(f"{NAME}-1", "job ended")]
    nothing_left(gce_env.fake)
