"""The real `mlcloud` process against a plain moto EC2 server (AWS_ENDPOINT_URL), as users' CI
runs it, with instances reached through a proxy command that routes their addresses to
loopback sshd nodes."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import threading
import time

import boto3
import pytest
from conftest import MLCLOUD, relay_pool, run_cli

pytestmark = pytest.mark.e2e


def ec2():
    return boto3.client("ec2", region_name="us-east-1")


def live_instances() -> list[dict]:
    out = ec2().describe_instances(
        Filters=[
            {"Name": "tag-key", "Values": ["mlcloud-cluster"]},
            {
                "Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped"],
            },
        ]
    )
    return [i for r in out["Reservations"] for i in r["Instances"]]


def mlcloud_resources() -> dict[str, int]:
    c = ec2()
    tag = [{"Name": "tag-key", "Values": ["mlcloud-cluster"]}]
    return {
        "instances": len(live_instances()),
        "security_groups": len(c.describe_security_groups(Filters=tag)["SecurityGroups"]),
        "key_pairs": len(c.describe_key_pairs(Filters=tag)["KeyPairs"]),
    }  # a plain moto server has no placement groups: mlcloud goes without


def up_args(name, nodes, proxy, count) -> list[str]:
    return [
        "up",
        name,
        "--provider",
        "aws",
        "--nodes",
        str(count),
        "--instance-type",
        "g5.xlarge",
        "--identity",
        str(nodes.client_key),
        "--ssh-user",
        nodes.user,
        "--ssh-port",
        str(nodes.port),
        "--proxy-command",
        proxy,
        "--allow-ssh-from",
        "127.0.0.1/32",
        "--yes",
    ]


def test_up_4_status_down_leaves_nothing(moto_server, make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(4)
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    r = run_cli(*up_args("gpu4", nodes, proxy, 4))
    assert r.returncode == 0, r.stderr
    st = json.loads(run_cli("status", "--json").stdout)["clusters"][0]
    assert st["provider"] == "aws" and st["num_nodes"] == 4
    assert all(n["id"].startswith("i-") for n in st["nodes"])
    # each node knows the address it really has (here: its loopback sshd), for rendezvous
    assert sorted(n["private_ip"] for n in st["nodes"]) == sorted(n.host for n in nodes.nodes)
    assert mlcloud_resources() == {
        "instances": 4,
        "security_groups": 1,
        "key_pairs": 1,
    }
    # the endpoint lacks placement groups: said once, in one line, and the nodes go without
    warned = [line for line in r.stderr.splitlines() if "placement group" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: no cluster placement group")
    tags = {t["Key"]: t["Value"] for t in live_instances()[0]["Tags"]}
    assert tags["mlcloud-cluster"] == st["uid"] and tags["Name"] == "mlcloud-gpu4"
    r = run_cli("down", "gpu4", "--yes")
    assert r.returncode == 0, r.stderr
    assert mlcloud_resources() == {
        "instances": 0,
        "security_groups": 0,
        "key_pairs": 0,
    }
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
    r = run_cli("down", "gpu4", "--yes")  # harmless the second time, and said: not_found
    assert r.returncode == 1 and "no cluster named 'gpu4'" in r.stderr, r.stderr


def test_killed_up_rerun_never_duplicates(moto_server, make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(2)
    pool, proxy = relay_pool(tmp_path, [])  # nothing routed yet: the nodes "boot" slowly
    proc = subprocess.Popen(
        [MLCLOUD, *up_args("crash", nodes, proxy, 2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    deadline = time.time() + 60
    while len(live_instances()) < 2 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # right after RunInstances, mid-bootstrap
    proc.wait(10)
    assert len(live_instances()) == 2
    pool.write_text(json.dumps({"pool": [n.host for n in nodes.nodes], "routes": {}}))
    r = run_cli(*up_args("crash", nodes, proxy, 2))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert len(live_instances()) == 2  # the same two, no duplicate
    assert run_cli("down", "crash", "--yes").returncode == 0
    assert mlcloud_resources() == {
        "instances": 0,
        "security_groups": 0,
        "key_pairs": 0,
    }


def test_train_ddp_across_two_instances(moto_server, make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(2)
    _, proxy = relay_pool(tmp_path, [n.host for n in nodes.nodes])
    assert run_cli("init", str(tmp_path / "proj")).returncode == 0
    r = run_cli(*up_args("ddp", nodes, proxy, 2))
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "train",
        "ddp",
        "-w",
        str(tmp_path / "proj"),
        "--nproc-per-node",
        "2",
        "--down",
        "train.py",
        "--",
        "--steps",
        "30",
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert sorted(int(m) for m in re.findall(r"\] rank (\d)/4 ", r.stdout)) == [0, 1, 2, 3]
    assert "done steps=30 world_size=4" in r.stdout
    assert mlcloud_resources()["instances"] == 0  # --down


def test_missing_credentials_is_one_line(moto_server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    r = run_cli(
        "up",
        "nocreds",
        "--provider",
        "aws",
        "--instance-type",
        "g5.xlarge",
        "--allow-ssh-from",
        "127.0.0.1/32",
        "--yes",
    )
    assert r.returncode == 5 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: no usable AWS credentials")
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []


def test_gc_finds_and_deletes_only_tagged_orphans(
    moto_server, make_ssh_nodes, tmp_path, mlcloud_home
):
    nodes = make_ssh_nodes(1)
    _, proxy = relay_pool(tmp_path, [nodes.nodes[0].host])
    assert run_cli(*up_args("lost", nodes, proxy, 1)).returncode == 0
    untagged = ec2().run_instances(
        ImageId="ami-0ubuntu", MinCount=1, MaxCount=1, InstanceType="t3.micro"
    )["Instances"][0]["InstanceId"]
    (mlcloud_home / "state.db").unlink()  # the laptop lost its state
    for suffix in ("-wal", "-shm"):
        (mlcloud_home / f"state.db{suffix}").unlink(missing_ok=True)
    r = run_cli("gc", "--provider", "aws", "--json")
    assert r.returncode == 0, r.stderr
    orphans = json.loads(r.stdout)["orphans"]
    assert sorted(o["kind"] for o in orphans) == ["instance", "key-pair", "security-group"]
    assert all(o["this_home"] and o["action"].startswith("kept: made 0 min ago") for o in orphans)
    r = run_cli("gc", "--provider", "aws", "--yes")  # launched just now: never deleted
    assert r.returncode == 0 and "deleted 0 resource(s), kept 3" in r.stdout, r.stdout
    assert mlcloud_resources()["instances"] == 1  # listed, not deleted
    r = run_cli("gc", "--provider", "aws", "--yes", "--min-age", "0")
    assert r.returncode == 0 and "deleted 3" in r.stdout, r.stdout
    assert mlcloud_resources() == {
        "instances": 0,
        "security_groups": 0,
        "key_pairs": 0,
    }
    state = ec2().describe_instances(InstanceIds=[untagged])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "running"  # never touched


def test_gpu_ask_picks_cheapest_region_and_type_and_money_shows(
    moto_server, make_ssh_nodes, tmp_path
):
    nodes = make_ssh_nodes(1)
    _, proxy = relay_pool(tmp_path, [nodes.nodes[0].host])
    args = [
        a for a in up_args("money", nodes, proxy, 1) if a not in ("--instance-type", "g5.xlarge")
    ]
    r = run_cli(*args, "--gpus", "A100:8", "--max-hours", "10", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["plan"]["instance_type"] == "p4d.24xlarge" and out["plan"]["region"] == "us-east-1"
    assert out["plan"]["usd_per_hour"] == pytest.approx(21.96)
    assert out["plan"]["usd_for_max_hours"] == pytest.approx(219.6)
    assert live_instances()[0]["InstanceType"] == "p4d.24xlarge"
    st = json.loads(run_cli("status", "--json").stdout)["clusters"][0]
    assert st["usd_per_hour"] == pytest.approx(21.96)
    assert run_cli("down", "money", "--yes").returncode == 0
    cost = json.loads(run_cli("cost", "--json").stdout)
    (c,) = cost["clusters"]
    assert c["name"] == "money" and c["status"] == "DOWN" and c["usd_per_hour"] == 0
    assert c["usd"] > 0 and cost["by_provider"]["aws"] == pytest.approx(c["usd"], abs=1e-3)


def test_plan_is_confirmed_or_refused_without_a_terminal(moto_server):
    r = run_cli(
        "up",
        "ask",
        "--provider",
        "aws",
        "--instance-type",
        "g5.xlarge",
        "--allow-ssh-from",
        "127.0.0.1/32",
    )
    assert r.returncode == 2 and "--yes" in r.stderr
    assert "g5.xlarge" in r.stdout  # the plan was shown first
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
    assert live_instances() == []


def wipe_state(home) -> None:
    for suffix in ("", "-wal", "-shm"):
        (home / f"state.db{suffix}").unlink(missing_ok=True)


def test_gc_leaves_other_homes_clusters_unless_told(
    moto_server, make_ssh_nodes, tmp_path, mlcloud_home, monkeypatch
):
    """A second CI runner (same OS user, its own empty home) must not take a live cluster
    for an orphan."""
    nodes = make_ssh_nodes(1)
    _, proxy = relay_pool(tmp_path, [nodes.nodes[0].host])
    assert run_cli(*up_args("live", nodes, proxy, 1)).returncode == 0
    first_home = (mlcloud_home / "id").read_text().strip()
    tags = {t["Key"]: t["Value"] for t in live_instances()[0]["Tags"]}
    assert tags["mlcloud-owner"] == first_home
    assert tags["mlcloud-identity"] == "arn:aws:sts::123456789012:user/moto"
    monkeypatch.setenv("MLCLOUD_HOME", str(tmp_path / "runner-2"))
    r = run_cli("gc", "--provider", "aws", "--yes", "--min-age", "0")
    assert r.returncode == 0, r.stderr
    assert "other owner " + first_home in r.stdout and "deleted 0" in r.stdout
    assert len(live_instances()) == 1  # untouched
    out = json.loads(run_cli("gc", "--provider", "aws", "--json").stdout)
    assert {o["owner"] for o in out["orphans"]} == {first_home}
    assert not any(o["this_home"] for o in out["orphans"])
    assert out["orphans"][0]["identity"] == "arn:aws:sts::123456789012:user/moto"
    r = run_cli("gc", "--provider", "aws", "--owner", first_home, "--min-age", "0", "--yes")
    assert r.returncode == 0 and "deleted 3" in r.stdout, r.stdout
    assert mlcloud_resources() == {"instances": 0, "security_groups": 0, "key_pairs": 0}
    monkeypatch.setenv("MLCLOUD_HOME", str(mlcloud_home))
    assert run_cli("down", "live", "--yes").returncode == 0  # the first home forgets it


def test_gc_all_owners_still_needs_yes_and_age(moto_server, make_ssh_nodes, tmp_path, monkeypatch):
    nodes = make_ssh_nodes(1)
    _, proxy = relay_pool(tmp_path, [nodes.nodes[0].host])
    assert run_cli(*up_args("theirs", nodes, proxy, 1)).returncode == 0
    monkeypatch.setenv("MLCLOUD_HOME", str(tmp_path / "runner-2"))
    r = run_cli("gc", "--provider", "aws", "--all-owners", "--min-age", "0", "--dry-run")
    assert r.returncode == 0 and "rerun without --dry-run to delete the 3" in r.stdout, r.stdout
    r = run_cli("gc", "--provider", "aws", "--all-owners", "--yes")  # too young
    assert "deleted 0" in r.stdout and len(live_instances()) == 1
    r = run_cli("gc", "--provider", "aws", "--all-owners", "--yes", "--min-age", "0")
    assert "deleted 3" in r.stdout and live_instances() == []


class _Html500(http.server.BaseHTTPRequestHandler):
    """An endpoint that answers every request with a web server's HTML error page."""

    def _fail(self):
        body = b"<!doctype html><html><title>500 Internal Server Error</title></html>\n"
        self.send_response(500)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _fail

    def log_message(self, *args):
        pass


def test_html_500_endpoint_fails_in_one_line_within_seconds(aws_env, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Html500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    try:
        t0 = time.monotonic()
        r = run_cli(
            "up",
            "html",
            "--provider",
            "aws",
            "--instance-type",
            "g5.xlarge",
            "--allow-ssh-from",
            "127.0.0.1/32",
            "--yes",
        )
        took = time.monotonic() - t0
        # it never asked for a node, so nothing is left stuck: no STOPPING row to clear by hand
        listed = json.loads(run_cli("status", "--json").stdout)["clusters"]
    finally:
        server.shutdown()
    assert r.returncode == 1 and "Traceback" not in r.stderr and "<" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: aws: DescribeAvailabilityZones in us-east-1 failed: ")
    assert last.endswith("; --debug for details")
    assert took < 15, took
    assert listed == [], listed


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--instance-type", "nosuch.huge"], "--instance-type nosuch.huge: not an EC2 instance"),
        (["--instance-type", "p4d.24xlarg"], "did you mean p4d.24xlarge"),
        (["--instance-type", "g5.xlarge", "--region", "mars-1"], "--region mars-1: not an AWS"),
    ],
)
def test_unknown_instance_type_or_region_refused_before_ec2(moto_server, flags, says):
    r = run_cli("up", "typo", "--provider", "aws", *flags, "--allow-ssh-from", "127.0.0.1/32")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]  # one line
    assert says in r.stderr and r.stdout == ""  # before the plan
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
    assert live_instances() == []


def test_sigterm_twice_during_bootstrap_still_rolls_back(moto_server, make_ssh_nodes, tmp_path):
    """`timeout` (and a kill of the process group) delivers SIGTERM twice: the second must not
    cut short the rollback the first started, or instances are left billing."""
    nodes = make_ssh_nodes(1)
    _, proxy = relay_pool(tmp_path, [])  # the instances never answer: `up` waits in bootstrap
    proc = subprocess.Popen(
        [MLCLOUD, *up_args("twice", nodes, proxy, 2)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("waiting for 2 node(s)"):
            break
    proc.send_signal(signal.SIGTERM)
    for line in proc.stderr:
        lines.append(line)
        if "removing what was created" in line:
            proc.send_signal(signal.SIGTERM)  # mid-rollback, as the second delivery lands
            break
    lines += proc.stderr.readlines()
    assert proc.wait(60) == 130, "".join(lines)
    assert lines[-1] == "error: interrupted\n", "".join(lines)
    assert mlcloud_resources() == {"instances": 0, "security_groups": 0, "key_pairs": 0}
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
