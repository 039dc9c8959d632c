"""`mlcloud doctor`, the real console script: its checks on a healthy and a damaged home, and
`--rebuild` bringing back clusters from the local node directories, the ssh provider's host
registries and the clouds' tags (a moto server), after which `down` removes them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import boto3
import pytest
from conftest import run_cli, ssh_up_args, tagged_pids
from test_cli_imports import HEAVY, PROBE


def doctor(*args: str, timeout: float = 120):
    r = run_cli("doctor", "--json", *args, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r, json.loads(r.stdout)


def checks(report: dict, area: str) -> list[dict]:
    return [c for c in report["checks"] if c["area"] == area]


def corrupt(home) -> None:
    for extra in ("-wal", "-shm"):
        (home / f"state.db{extra}").unlink(missing_ok=True)
    (home / "state.db").write_bytes(b"\x00garbage, not sqlite\n" * 200)


def names() -> list[str]:
    r = run_cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return [c["name"] for c in json.loads(r.stdout)["clusters"]]


def test_fresh_home_is_fine_and_not_created(mlcloud_home):
    r, report = doctor()
    assert r.returncode == 0 and report["ok"] and report["rebuild"] is None
    assert not mlcloud_home.exists()


def test_healthy_home_with_a_local_cluster(mlcloud_home):
    assert run_cli("up", "ok1", "--nodes", "2", "--yes").returncode == 0
    try:
        r, report = doctor()
        assert r.returncode == 0, r.stderr
        assert [c["status"] for c in checks(report, "database")] == ["ok"]
        assert [(c["subject"], c["detail"]) for c in checks(report, "nodes")] == [
            ("ok1 node0 (local-0)", "reachable"),
            ("ok1 node1 (local-1)", "reachable"),
        ]
        r = run_cli("doctor")  # the table, for a person
        assert r.returncode == 0 and "reachable" in r.stdout and r.stderr == ""
    finally:
        assert run_cli("down", "ok1", "--yes").returncode == 0


def test_a_home_mlcloud_made_has_nothing_to_warn_about(mlcloud_home):
    from mlcloud.state import paths

    paths.logs_dir("c1")  # what `train` makes: logs/ and logs/c1
    r, report = doctor()
    assert r.returncode == 0, r.stderr
    assert [c for c in report["checks"] if c["status"] != "ok"] == []


def test_node_directory_gone_is_reported(mlcloud_home):
    assert run_cli("up", "gone", "--nodes", "2", "--yes").returncode == 0
    try:
        node1 = next((mlcloud_home / "local").glob("gone-*/node-1"))
        uid = node1.parent.name
        for pid in tagged_pids(f"{uid}.1."):  # its agent, which would write into it meanwhile
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        while tagged_pids(f"{uid}.1.") and time.time() < deadline:
            time.sleep(0.05)
        shutil.rmtree(node1)
        r, report = doctor()
        assert r.returncode == 1 and not report["ok"]
        bad = [c for c in checks(report, "nodes") if c["status"] == "fail"]
        assert len(bad) == 1 and "node1" in bad[0]["subject"] and "gone" in bad[0]["detail"]
        line = r.stderr.strip()
        assert line.startswith("error: gone node1") and "mlcloud down gone" in line
    finally:
        run_cli("down", "gone", "--yes", "--purge")


def test_loose_permissions_are_warned_about(mlcloud_home):
    assert run_cli("status").returncode == 0
    (mlcloud_home / "keys").mkdir(mode=0o755)
    (mlcloud_home / "keys").chmod(0o755)
    (mlcloud_home / "state.db").chmod(0o644)
    r, report = doctor()
    assert r.returncode == 0, r.stderr  # warnings, not failures
    warned = {c["subject"]: c["detail"] for c in checks(report, "home") if c["status"] == "warn"}
    assert warned == {
        str(mlcloud_home / "keys"): f"readable by others: chmod 700 {mlcloud_home / 'keys'}",
        str(mlcloud_home / "state.db"): f"readable by others: chmod 600 {mlcloud_home}/state.db",
    }


def test_locks_held_and_left_over(mlcloud_home):
    from filelock import FileLock

    assert run_cli("status").returncode == 0  # makes the home
    locks = mlcloud_home / "locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    (locks / "ghost.lock").write_text("")
    held = FileLock(str(locks / "busy.lock"))
    with held:
        r, report = doctor()
    assert r.returncode == 0, r.stderr
    found = {c["subject"].rsplit("/", 1)[-1]: c["detail"] for c in checks(report, "locks")}
    assert "no longer in state" in found["ghost.lock"]
    assert "held" in found["busy"]
    assert (locks / "ghost.lock").exists()  # never deleted: another process may open it


def test_corrupt_database_rebuilt_from_local_node_directories(mlcloud_home):
    for name, count in (("alpha", 2), ("beta", 1)):
        assert run_cli("up", name, "--nodes", str(count), "--yes").returncode == 0
    uids = sorted(p.name for p in (mlcloud_home / "local").iterdir())
    corrupt(mlcloud_home)
    r, report = doctor()
    assert r.returncode == 1 and not report["ok"]
    assert "not a database" in checks(report, "database")[0]["detail"]
    # without a terminal and without --yes: refused, nothing moved
    r = run_cli("doctor", "--rebuild", "-p", "local")
    assert r.returncode == 2 and "--yes" in r.stderr
    assert not list(mlcloud_home.glob("state.db.corrupt-*"))
    r, report = doctor("--rebuild", "--yes", "-p", "local")
    assert r.returncode == 0, r.stderr
    rebuilt = report["rebuild"]
    assert sorted(c["uid"] for c in rebuilt["clusters"]) == uids
    assert sorted((c["name"], c["nodes"]) for c in rebuilt["clusters"]) == [
        ("alpha", 2),
        ("beta", 1),
    ]
    assert rebuilt["moved_to"] and (mlcloud_home / rebuilt["moved_to"].rsplit("/", 1)[1]).exists()
    assert [c["detail"] for c in checks(report, "nodes")] == ["reachable"] * 3
    assert names() == ["alpha", "beta"]
    r = run_cli("exec", "alpha", "--", "echo hi")
    assert r.returncode == 0 and "hi" in r.stdout, r.stderr
    r = run_cli("down", "--all", "--yes")
    assert r.returncode == 0, r.stderr
    assert not any((mlcloud_home / "local").iterdir())
    # a healthy database is kept: a second rebuild finds nothing it lacks
    r, report = doctor("--rebuild", "--yes", "-p", "local")
    assert r.returncode == 0 and report["rebuild"]["clusters"] == []
    assert report["rebuild"]["moved_to"] is None


def test_busy_database_is_never_moved_aside(mlcloud_home, monkeypatch):
    import sqlite3

    monkeypatch.setenv("MLCLOUD_DB_BUSY_TIMEOUT", "2")  # default 10 s: found busy sooner
    assert run_cli("up", "busy", "--nodes", "1", "--yes").returncode == 0
    db = sqlite3.connect(mlcloud_home / "state.db", isolation_level=None)
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("BEGIN EXCLUSIVE")  # shuts other connections out, readers too
    try:
        r, report = doctor()
        assert r.returncode == 0, r.stderr
        assert checks(report, "database")[0]["status"] == "warn"
        r = run_cli("doctor", "--rebuild", "--yes", "-p", "local")
        assert r.returncode != 0 and "busy" in r.stderr and "Traceback" not in r.stderr
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert not list(mlcloud_home.glob("state.db.corrupt-*"))
    assert names() == ["busy"]
    assert run_cli("down", "busy", "--yes").returncode == 0


def test_missing_database_rebuilt(mlcloud_home):
    assert run_cli("up", "lost", "--nodes", "1", "--yes").returncode == 0
    for extra in ("", "-wal", "-shm"):
        (mlcloud_home / f"state.db{extra}").unlink(missing_ok=True)
    assert names() == []  # which makes a new, empty, healthy database
    r, report = doctor("--rebuild", "--yes", "-p", "local")
    assert r.returncode == 0 and report["rebuild"]["moved_to"] is None
    assert names() == ["lost"]
    r, report = doctor("--rebuild", "--yes", "-p", "local")  # known now: not added twice
    assert report["rebuild"]["clusters"] == [] and names() == ["lost"]
    assert run_cli("down", "lost", "--yes").returncode == 0


@pytest.mark.e2e
def test_rebuild_from_ssh_registry_and_unreachable_node(make_ssh_nodes, mlcloud_home):
    nodes = make_ssh_nodes(1)
    assert run_cli(*ssh_up_args(nodes, "lab")).returncode == 0
    corrupt(mlcloud_home)
    r, report = doctor("--rebuild", "--yes", "-p", "ssh")
    assert r.returncode == 0, r.stderr
    assert [(c["name"], c["provider"], c["nodes"]) for c in report["rebuild"]["clusters"]] == [
        ("lab", "ssh", 1)
    ]
    assert [c["detail"] for c in checks(report, "nodes")] == ["reachable"]
    nodes.stop()
    started = time.monotonic()
    r, report = doctor("--timeout", "3")
    assert time.monotonic() - started < 30
    assert r.returncode == 1
    (bad,) = checks(report, "nodes")
    assert bad["status"] == "fail" and "mlcloud down lab" in bad["detail"]


def _tagged_instances(uid: str, name: str, owner: str, count: int) -> list[str]:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    tags = [
        {"Key": "mlcloud-cluster", "Value": uid},
        {"Key": "mlcloud-name", "Value": name},
        {"Key": "mlcloud-owner", "Value": owner},
    ]
    out = ec2.run_instances(
        ImageId="ami-0ubuntu",
        MinCount=count,
        MaxCount=count,
        InstanceType="g5.xlarge",
        TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
    )
    return [i["InstanceId"] for i in out["Instances"]]


def _live(ids: list[str]) -> int:
    ec2 = boto3.client("ec2", region_name="us-east-1")
    out = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    return sum(i["State"]["Name"] in ("pending", "running") for r in out for i in r["Instances"])


@pytest.mark.e2e
def test_rebuild_from_cloud_tags_takes_only_this_homes_clusters(moto_server, mlcloud_home):
    from mlcloud.state import paths

    me = paths.home_id()  # the home's id, made with it: what `up` tags clusters with
    mine = _tagged_instances("gpu-0a1b2c3d", "gpu", me, 2)
    theirs = _tagged_instances("other-99aa88bb", "other", "someone-else", 1)
    corrupt(mlcloud_home)
    r, report = doctor("--rebuild", "--yes", "-p", "aws", timeout=180)
    assert "Traceback" not in r.stderr
    (got,) = report["rebuild"]["clusters"]
    assert (got["name"], got["uid"], got["nodes"], got["region"]) == (
        "gpu",
        "gpu-0a1b2c3d",
        2,
        "us-east-1",
    )
    assert any("another home" in n for n in report["rebuild"]["notes"])
    st = json.loads(run_cli("status", "--json").stdout)["clusters"]
    assert [(c["name"], sorted(n["id"] for n in c["nodes"])) for c in st] == [("gpu", sorted(mine))]
    r = run_cli("down", "gpu", "--yes", timeout=180)
    assert r.returncode == 0, r.stderr
    assert _live(mine) == 0 and _live(theirs) == 1  # another home's cluster is left alone
    assert names() == []
    boto3.client("ec2", region_name="us-east-1").terminate_instances(InstanceIds=theirs)


@pytest.mark.parametrize(
    "args",
    [["doctor", "--help"], ["doctor"], ["doctor", "--json"], ["status", "ghost", "--json"]],
    ids=" ".join,
)
def test_doctor_and_failures_import_no_sdk(args, tmp_path):
    """doctor on a home without clusters, and a failing command, stay light (no boto3,
    paramiko, torch): what test_cli_imports holds for the other commands."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), json.dumps(sorted(HEAVY))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("MODULES=")]
    assert json.loads(line.removeprefix("MODULES=")) == [], proc.stderr


def test_rebuild_goes_on_past_a_provider_that_fails(aws_env, monkeypatch, mlcloud_home):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert run_cli("up", "kept", "--nodes", "1", "--yes").returncode == 0
    corrupt(mlcloud_home)
    r, report = doctor("--rebuild", "--yes", "-p", "aws", "-p", "nosuch", "-p", "local")
    # what could be found is rebuilt, but the exit says the rebuild is not whole
    assert r.returncode == 1 and report["ok"] is False, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: rebuild incomplete: aws, nosuch")
    notes = report["rebuild"]["notes"]
    assert any(n.startswith("aws: not searched (aws: ") for n in notes), notes  # not a repr
    assert any(n.startswith("nosuch: cannot list") for n in notes), notes
    assert [c["name"] for c in report["rebuild"]["clusters"]] == ["kept"]
    assert run_cli("down", "kept", "--yes").returncode == 0


@pytest.mark.parametrize("kind", ["dangling-link", "link-loop", "dev-null", "directory"])
def test_database_that_is_no_file_is_failed_and_rebuilt(mlcloud_home, kind):
    """A state.db that sqlite cannot use as a file: every command fails on it, so doctor
    must say so (not "none yet" or "integrity ok") and --rebuild must move it aside."""
    assert run_cli("up", "keep", "--nodes", "1", "--yes").returncode == 0
    db = mlcloud_home / "state.db"
    for extra in ("", "-wal", "-shm"):
        (mlcloud_home / f"state.db{extra}").unlink(missing_ok=True)
    if kind == "dangling-link":
        db.symlink_to(mlcloud_home / "gone" / "state.db")
    elif kind == "link-loop":
        db.symlink_to(mlcloud_home / "loop")
        (mlcloud_home / "loop").symlink_to(db)
    elif kind == "dev-null":
        db.symlink_to("/dev/null")
    else:
        db.mkdir()
    assert run_cli("status").returncode == 1
    r, report = doctor()
    assert r.returncode == 1 and not report["ok"], report
    assert checks(report, "database")[0]["status"] == "fail"
    r, report = doctor("--rebuild", "--yes", "-p", "local")
    assert r.returncode == 0, r.stderr
    assert report["rebuild"]["moved_to"]
    assert names() == ["keep"]
    assert run_cli("down", "keep", "--yes").returncode == 0
