"""The node side of durable checkpoints (templates/checkpoints.py): S3 on the run's moto server,
Cloud Storage on the fake Compute API's, and node_ctl running it beside a plain job.
A reader only ever sees a complete checkpoint, restored under its own name whether a file or a
directory; uploads are newest only, by `pull --checkpoints`' convention; a bucket out of reach
is said once and costs the job nothing."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tagged_pids

from mlcloud import templates

sys.path.insert(0, str(templates.ROOT))  # checkpoints.py imports send.py, as on a node
_spec = importlib.util.spec_from_file_location("checkpoints", templates.path("checkpoints.py"))
ck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ck)
sys.path.remove(str(templates.ROOT))


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def write(path: Path, step: int, size: int = 3000) -> bytes:
    data = hashlib.sha256(str(step).encode()).digest() * (size // 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def settle_and_poll(up) -> str:
    """Two looks: the first sees the checkpoint, the second finds it unchanged."""
    first = up.poll()
    return first if first != "waiting" else up.poll()


@pytest.fixture
def s3(moto_server):
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="ckpts")
    return client


def keys(s3) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="ckpts").get("Contents", []))


def test_s3_newest_only_previous_kept_and_an_empty_disk_restores_the_newest(s3, tmp_path):
    src, said = tmp_path / "src", []
    store = ck.open_store("s3://ckpts/runs/lab", print)
    up = ck.Uploader(store, str(src), 0, said.append)
    assert up.poll() == "idle"  # no directory yet
    for step in (10, 20, 30):
        write(src / f"ckpt-{step}.json", step)
        assert settle_and_poll(up) == "uploaded"
        assert up.poll() == "idle"  # uploaded once
    assert said == [f"checkpoints: step {s} uploaded to s3://ckpts/runs/lab" for s in (10, 20, 30)]
    manifest = json.loads(s3.get_object(Bucket="ckpts", Key="runs/lab/latest.json")["Body"].read())
    assert manifest["step"] == 30 and manifest["name"] == "ckpt-30.json"
    data = [k for k in keys(s3) if k != "runs/lab/latest.json"]
    assert sorted(k.split("/")[-1] for k in data) == ["ckpt-20.json", "ckpt-30.json"]

    empty, said = tmp_path / "new-node", []
    assert ck.restore(store, str(empty), said.append) == 30
    assert said == ["checkpoints: restored step 30 from s3://ckpts/runs/lab"]
    assert [p.name for p in empty.iterdir()] == ["ckpt-30.json"]  # no temporary left
    assert (empty / "ckpt-30.json").read_bytes() == (src / "ckpt-30.json").read_bytes()
    # a disk that has it, or a newer one, is left as it is
    assert ck.restore(store, str(empty), said.append) is None
    assert ck.restore(store, str(src), said.append) is None and len(said) == 1


def test_a_directory_checkpoint_travels_whole_and_in_progress_names_never(s3, tmp_path):
    src = tmp_path / "src"
    store = ck.open_store("s3://ckpts/dcp", print)
    up = ck.Uploader(store, str(src), 0, lambda line: None)
    write(src / "step_100" / "model" / "shard-0.bin", 1)
    write(src / "step_100" / ".metadata", 2, size=64)
    write(src / "step_200.tmp" / "shard-0.bin", 3)  # being written: the convention skips it
    write(src / ".step_300" / "x", 4)
    write(src / "step_400.partial", 5)
    assert settle_and_poll(up) == "uploaded"
    assert ck.read_manifest(store).step == 100

    # a checkpoint still changing between two looks waits until it stands still
    write(src / "step_500" / "a", 6)
    assert up.poll() == "waiting"
    write(src / "step_500" / "b", 7)
    assert up.poll() == "waiting"
    assert up.poll() == "uploaded"

    dest = tmp_path / "dest"
    assert ck.restore(store, str(dest), print) == 500
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "step_500",
        "step_500/a",
        "step_500/b",
    ]
    assert (dest / "step_500" / "b").read_bytes() == (src / "step_500" / "b").read_bytes()


def test_the_last_pass_takes_the_newest_at_once_and_ends_on_an_empty_one(s3, tmp_path):
    src, said = tmp_path / "src", []
    store = ck.open_store("s3://ckpts/last", print)
    up = ck.Uploader(store, str(src), 0, said.append)
    write(src / "ckpt-1", 1)
    up.final()  # no second look: the job has ended, nothing changes any more
    assert said == ["checkpoints: step 1 uploaded to s3://ckpts/last"]
    (src / "ckpt-2").mkdir()  # a directory the job never filled
    up.final(sleep=lambda s: pytest.fail("the last pass waited"))
    assert ck.read_manifest(store).step == 1


def test_a_torn_object_is_refused_and_the_disk_untouched(s3, tmp_path):
    src = tmp_path / "src"
    store = ck.open_store("s3://ckpts/p", print)
    up = ck.Uploader(store, str(src), 0, lambda line: None)
    write(src / "ckpt-5.pt", 5)
    assert settle_and_poll(up) == "uploaded"
    (obj, _, _, _) = ck.read_manifest(store).files[0]
    s3.put_object(Bucket="ckpts", Key=f"p/{obj}", Body=b"torn")
    dest, said = tmp_path / "dest", []
    assert ck.restore(store, str(dest), said.append) is None
    assert list(dest.iterdir()) == []
    assert said == ["checkpoints: s3://ckpts/p changed twice while restoring; starting from "
                    "local disk"]  # fmt: skip


def test_the_manifest_comes_last_and_never_names_a_moved_checkpoint(s3, tmp_path):
    src = tmp_path / "src"
    store = ck.open_store("s3://ckpts/order", print)
    order: list[str] = []
    real_put, real_put_bytes = store.put, store.put_bytes

    def put(name, f, size):
        order.append(f"data:{name.split('/')[-1]}:{getattr(ck.read_manifest(store), 'step', None)}")
        real_put(name, f, size)

    def put_bytes(name, data):
        order.append(name)
        real_put_bytes(name, data)

    store.put, store.put_bytes = put, put_bytes
    up = ck.Uploader(store, str(src), 0, lambda line: None)
    for step in (5, 6):
        write(src / f"ckpt-{step}", step)
        assert settle_and_poll(up) == "uploaded"
    # while step 6's data travels, readers are still shown step 5: never a partial one
    assert order == ["data:ckpt-5:None", "latest.json", "data:ckpt-6:5", "latest.json"]

    # a checkpoint rewritten while it was read is not named: the next look takes it again
    write(src / "ckpt-7", 7)
    assert up.poll() == "waiting"
    real = ck._digest_file

    def touched_while_read(f):
        write(src / "ckpt-7", 70, size=6000)
        return real(f)

    ck._digest_file = touched_while_read
    try:
        assert up.poll() == "waiting"
    finally:
        ck._digest_file = real
    assert ck.read_manifest(store).step == 6
    assert settle_and_poll(up) == "uploaded"
    assert ck.read_manifest(store).files[0][2] == 6000 - 6000 % 32


def test_other_nodes_wait_their_turn_and_upload_only_what_the_bucket_lacks(s3, tmp_path):
    clock, said = Clock(), []
    store = ck.open_store("s3://ckpts/multi", print)
    node0 = ck.Uploader(store, str(tmp_path / "n0"), 0, said.append, clock)
    node2 = ck.Uploader(store, str(tmp_path / "n2"), 2, said.append, clock)
    for d in ("n0", "n2"):
        write(tmp_path / d / "ckpt-1", 1)
    assert settle_and_poll(node2) == "waiting"  # node 0's turn first
    assert settle_and_poll(node0) == "uploaded"
    assert node2.poll() == "idle"  # the bucket has it: nothing to send
    # a step only node 2 holds (global rank 0 was placed there) goes once its turn comes
    write(tmp_path / "n2" / "ckpt-2", 2)
    assert settle_and_poll(node2) == "waiting"
    clock.t += 2 * ck.STAGGER_S - 1
    assert node2.poll() == "waiting"
    clock.t += 1
    assert node2.poll() == "uploaded"
    assert said == [
        "checkpoints: step 1 uploaded to s3://ckpts/multi",
        "checkpoints: step 2 uploaded to s3://ckpts/multi",
    ]


def test_a_bucket_out_of_reach_is_said_once_and_the_job_goes_on(tmp_path, monkeypatch, aws_env):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    store = ck.open_store("s3://ckpts/away", print)
    clock, said = Clock(), []
    up = ck.Uploader(store, str(tmp_path), 0, said.append, clock)
    write(tmp_path / "ckpt-1", 1)
    assert settle_and_poll(up) == "failed"
    assert up.poll() == "waiting"  # not again at every look
    write(tmp_path / "ckpt-2", 2)
    assert settle_and_poll(up) == "failed"  # a newer one is tried at once, and not said again
    assert len(said) == 1
    assert said[0].startswith("checkpoints: cannot upload step 1 to s3://ckpts/away: ")
    assert said[0].endswith("checkpoints stay on this node's disk, and later ones are tried")

    said.clear()
    assert ck.restore(store, str(tmp_path / "new"), said.append) is None
    assert len(said) == 1 and said[0].endswith("; starting from local disk")


def test_a_manifest_the_ddp_template_wrote_restores(s3, tmp_path):
    data = b"x" * 100
    s3.put_object(Bucket="ckpts", Key="old/ckpt-00000040-ab12.pt", Body=data)
    manifest = {
        "step": 40,
        "key": "ckpt-00000040-ab12.pt",
        "size": 100,
        "sha256": hashlib.sha256(data).hexdigest(),
        "previous": None,
    }
    s3.put_object(Bucket="ckpts", Key="old/latest.json", Body=json.dumps(manifest))
    store = ck.open_store("s3://ckpts/old", print)
    assert ck.restore(store, str(tmp_path), print) == 40
    assert (tmp_path / "ckpt-00000040.pt").read_bytes() == data


def test_a_manifest_naming_a_path_outside_is_refused(s3, tmp_path):
    bad = {"step": 9, "name": "..", "key": "k", "files": [["k/x", "", 1, "0"]], "previous": None}
    s3.put_object(Bucket="ckpts", Key="evil/latest.json", Body=json.dumps(bad))
    said: list[str] = []
    assert (
        ck.restore(ck.open_store("s3://ckpts/evil", print), str(tmp_path / "d"), said.append)
        is None
    )
    assert len(said) == 1 and "not a checkpoint" in said[0]


def test_without_boto3_one_clear_line_and_no_store(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    said: list[str] = []
    assert ck.open_store("s3://ckpts/p", said.append) is None
    assert len(said) == 1 and "boto3 is not installed" in said[0] and "s3://ckpts/p" in said[0]


@pytest.fixture
def gcs(gce_fake, monkeypatch):
    """The fake Compute API's Cloud Storage, reached as a node reaches an emulator."""
    gce_fake.create_bucket("ckpt-eu")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gce_fake.url)
    return gce_fake


def test_gcs_through_the_json_api(gcs, tmp_path):
    src = tmp_path / "src"
    store = ck.open_store("gs://ckpt-eu/runs/lab", print)
    up = ck.Uploader(store, str(src), 0, lambda line: None)
    for step in (7, 8, 9):
        write(src / f"ckpt-{step}.pt", step)
        assert settle_and_poll(up) == "uploaded"
    names = sorted(gcs.objects("ckpt-eu"))
    assert "ckpt-eu/runs/lab/latest.json" in names and len(names) == 3  # manifest + newest two
    dest = tmp_path / "dest"
    assert ck.restore(store, str(dest), print) == 9
    assert (dest / "ckpt-9.pt").read_bytes() == (src / "ckpt-9.pt").read_bytes()


# ---- node_ctl runs it beside a job ----------------------------------------------------------

CTL = str(templates.path("node_ctl.py"))
PLAIN = """
import json, os, sys, time
d = os.environ["MLCLOUD_CHECKPOINT_DIR"]
have = [int(n[5:-5]) for n in os.listdir(d) if n.startswith("ckpt-") and n.endswith(".json")]
start = max(have, default=0)
print(f"resumed from {start}", flush=True)
for step in range(start + 1, start + int(sys.argv[1]) + 1):
    with open(os.path.join(d, f".ckpt-{step}.json.tmp"), "w") as f:
        json.dump({"step": step}, f)
    os.replace(os.path.join(d, f".ckpt-{step}.json.tmp"), os.path.join(d, f"ckpt-{step}.json"))
time.sleep(float(sys.argv[2]))
"""


def node_job(tmp_path: Path, tag: str, steps: int, linger: float) -> tuple[Path, Path]:
    jd, ckpt = tmp_path / "jobs" / tag, tmp_path / "checkpoints"
    jd.mkdir(parents=True)
    ckpt.mkdir(exist_ok=True)
    (tmp_path / "plain.py").write_text(PLAIN)
    env = {"MLCLOUD_CHECKPOINT_URI": "s3://ckpts/job", "MLCLOUD_CHECKPOINT_DIR": str(ckpt)}
    argv = [sys.executable, str(tmp_path / "plain.py"), str(steps), str(linger)]
    job = {"argv": argv, "cwd": str(tmp_path), "env": env, "tag": tag}
    (jd / "job.json").write_text(json.dumps(job))
    return jd, ckpt


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CTL, *args], capture_output=True, text=True, timeout=60)


def test_node_ctl_restores_before_the_job_and_uploads_its_last_checkpoint(s3, tmp_path):
    jd, ckpt = node_job(tmp_path, "ck1.0.1.", steps=3, linger=0)
    ctl("start", str(jd))
    r = ctl("follow", str(jd))
    assert r.returncode == 0, r.stdout + r.stderr
    # the job ended before its checkpoints settled: the last pass took the newest
    assert r.stdout.splitlines() == [
        "resumed from 0",
        "checkpoints: step 3 uploaded to s3://ckpts/job",
    ]
    assert tagged_pids("ck1.0.1.") == []  # the uploader never outlives the job

    for p in ckpt.iterdir():  # a new node: an empty disk
        p.unlink()
    jd, _ = node_job(tmp_path, "ck1.0.2.", steps=2, linger=0)
    ctl("start", str(jd))
    r = ctl("follow", str(jd))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "checkpoints: restored step 3 from s3://ckpts/job",
        "resumed from 3",
        "checkpoints: step 5 uploaded to s3://ckpts/job",
    ]


def test_cancel_reaches_the_uploader_and_its_last_pass_runs(s3, tmp_path):
    jd, _ = node_job(tmp_path, "ck2.0.1.", steps=2, linger=300)
    ctl("start", str(jd))
    log = jd / "output.log"
    deadline = time.time() + 30
    while time.time() < deadline and "uploaded" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)  # the uploader's looks, a second apart, see step 2 settle
    assert "checkpoints: step 2 uploaded" in log.read_text()
    assert len(tagged_pids("ck2.0.1.")) >= 3  # waiter, job, uploader
    ctl("cancel", str(jd), "ck2.0.1.", "10")
    assert tagged_pids("ck2.0.1.") == []
    r = ctl("follow", str(jd))
    assert r.returncode == 143 and r.stdout.count("uploaded") == 1


def test_the_uploader_never_outlives_a_killed_waiter(s3, tmp_path):
    import os
    import signal

    jd, _ = node_job(tmp_path, "ck3.0.1.", steps=1, linger=300)
    ctl("start", str(jd))
    deadline = time.time() + 30
    while len(tagged_pids("ck3.0.1.")) < 3 and time.time() < deadline:
        time.sleep(0.1)
    assert len(tagged_pids("ck3.0.1.")) >= 3  # waiter, job, uploader
    os.kill(int((jd / "waiter.pid").read_text()), signal.SIGKILL)
    deadline = time.time() + 30  # the reaper's grace is 5 s
    while tagged_pids("ck3.0.1.") and time.time() < deadline:
        time.sleep(0.1)
    assert tagged_pids("ck3.0.1.") == []


def test_a_last_upload_that_hangs_does_not_hold_the_jobs_end(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("node_ctl_t", CTL)
    node_ctl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node_ctl)
    monkeypatch.setattr(node_ctl, "FINAL_UPLOAD_S", 0.5)
    hung = subprocess.Popen(["sleep", "300"], stdin=subprocess.PIPE)
    with open(tmp_path / "output.log", "wb") as log:
        started = time.monotonic()
        node_ctl._last_upload(hung, log)
    assert time.monotonic() - started < 10 and hung.returncode == -9
    assert (tmp_path / "output.log").read_text() == (
        "checkpoints: the last upload did not end in 0.5 s\n"
    )
