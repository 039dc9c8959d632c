"""`mlcloud gc`: the ownership and age rule (pure), the question before deleting, and the
local provider's node directories found again, with their processes, once the state database
is gone."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

from conftest import run_cli, tagged_pids
from mlcloud.cli.app import run
from mlcloud.providers.base import Resource

from mlcloud.provision.gc import DELETE, decide

ME, OTHER, NOW = "home-me", "home-other", 10_000.0


def res(kind: str, uid: str, owner: str, created: float | None) -> Resource:
    return Resource("aws", kind, f"{kind}-{uid}", uid, uid, owner, "us-east-1", "", created)


def actions(found, owners=frozenset(), min_age_s=600.0) -> dict[str, str]:
    return {o.resource.id: o.action for o in decide(found, ME, owners, min_age_s, NOW)}


def test_only_this_homes_orphans_by_default():
    found = [res("instance", "a", ME, NOW - 3600), res("instance", "b", OTHER, NOW - 3600)]
    got = actions(found, set())
    assert got["instance-a"] == DELETE
    assert got["instance-b"].startswith("kept: other owner")
    assert actions(found, {OTHER})["instance-b"] == DELETE  # --owner
    assert actions(found, None)["instance-b"] == DELETE  # --all-owners


def test_a_young_cluster_is_kept_whole():
    """Its security group and key pair go with its instances, not before them."""
    found = [
        res("instance", "a", ME, NOW - 120),
        res("security-group", "a", ME, None),
        res("key-pair", "a", ME, NOW - 3600),
        res("security-group", "old", ME, None),  # age unknown, nothing young: may go
    ]
    got = actions(found)
    assert got["instance-a"] == got["security-group-a"] == got["key-pair-a"]
    assert got["instance-a"] == "kept: made 2 min ago (--min-age to delete)"
    assert got["security-group-old"] == DELETE
    assert actions(found, min_age_s=60)["security-group-a"] == DELETE


def test_local_nodes_found_and_removed_after_state_is_lost(mlcloud_home):
    r = run_cli("up", "lost", "--nodes", "2")
    assert r.returncode == 0, r.stderr
    uid = json.loads(run_cli("status", "--json").stdout)["clusters"][0]["uid"]
    # a job's process on node 1, tagged as node_ctl tags them
    job = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"],
        env={**os.environ, "MLCLOUD_PROC_TAG": f"{uid}.1.1."},
    )
    try:
        for suffix in ("", "-wal", "-shm"):
            (mlcloud_home / f"state.db{suffix}").unlink(missing_ok=True)
        r = run_cli("gc", "--provider", "local", "--json")
        assert r.returncode == 0, r.stderr
        orphans = json.loads(r.stdout)["orphans"]
        assert sorted(o["id"] for o in orphans) == [f"{uid}/node-0", f"{uid}/node-1"]
        assert all(o["this_home"] and o["action"].startswith("kept: made") for o in orphans)
        r = run_cli("gc", "--provider", "local", "--yes", "--min-age", "0")
        assert r.returncode == 0 and "deleted 2" in r.stdout, r.stdout + r.stderr
        assert job.wait(timeout=15) is not None  # stopped by tag
        assert not (mlcloud_home / "local" / uid).exists()
        assert tagged_pids(uid) == []
        assert "no orphaned resources" in run_cli("gc", "--provider", "local").stdout
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()


def test_ssh_hosts_of_a_forgotten_cluster_are_found_and_released(mlcloud_home):
    """The ssh provider's registry is what it holds: a cluster state forgot is found there,
    and its hosts released (one never logged in to is not even asked)."""
    registry = mlcloud_home / "ssh"
    registry.mkdir(mode=0o700, parents=True)
    uid = "gone-0123abcd"
    (registry / f"{uid}.json").write_text(
        json.dumps({"hosts": ["u@127.0.0.9:1", "u@127.0.0.10:1"], "claimed": [0], "reached": []})
    )
    r = run_cli("gc", "--provider", "ssh", "--json")
    assert r.returncode == 0, r.stderr
    (orphan,) = json.loads(r.stdout)["orphans"]
    assert orphan["id"] == f"{uid}/node-0" and orphan["this_home"]
    r = run_cli("gc", "--provider", "ssh", "--yes", "--min-age", "0")
    assert r.returncode == 0 and "deleted 1" in r.stdout, r.stdout + r.stderr
    assert not (registry / f"{uid}.json").exists()


def test_gc_of_an_unknown_provider_is_one_line():
    r = run_cli("gc", "--provider", "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "unknown provider 'nope'" in r.stderr


def test_gc_without_a_provider_skips_clouds_it_has_no_credentials_for(mlcloud_home, monkeypatch):
    """A user of one cloud runs `gc` without configuring the other: the clouds with no
    credentials here are said and skipped, the rest is searched."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(mlcloud_home / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(mlcloud_home / "none"))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    r = run_cli("gc", "--json")
    assert r.returncode == 0, r.stderr
    skipped = json.loads(r.stdout)["skipped"]
    assert [s.split(":")[0] for s in skipped] == ["aws", "gce"], skipped
    r = run_cli("gc", "--provider", "gce")
    assert r.returncode == 5 and r.stderr.count("\n") == 1, r.stderr


class _Terminal(io.StringIO):
    """stdin on a terminal, holding the answers typed there."""

    def isatty(self) -> bool:
        return True


def test_gc_asks_before_deleting_and_yes_skips_only_the_question(mlcloud_home, capsys, monkeypatch):
    """Plain `gc` lists, then asks; without a terminal it refuses (never hangs); `--dry-run`
    only lists; `--yes` deletes without the question, and only what is marked delete."""

    def gc(*args: str) -> tuple[int, str, str]:
        code = run(["gc", "--provider", "local", *args])
        return (code, *capsys.readouterr())

    node = mlcloud_home / "local" / "lost-0123abcd" / "node-0"
    node.mkdir(parents=True)
    old = time.time() - 3600  # the local provider dates a node by its directory
    os.utime(node, (old, old))
    code, out, err = gc()
    assert code == 2 and "lost-0123abcd/node-0" in out and node.exists()
    assert err == (
        "error: delete the 1 resource(s) marked delete? needs confirmation and there is no "
        "terminal to ask; rerun with --yes\n"
    )
    code, out, err = gc("--dry-run")
    assert code == 0 and out.endswith("rerun without --dry-run to delete the 1 marked delete\n")
    code, out, _ = gc("--dry-run", "--json", "--yes")
    assert code == 0 and json.loads(out)["deleted"] == 0 and node.exists()
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, out, err = gc()  # answered no: declined, not bad input
    assert code == 1 and node.exists()
    assert err == "delete the 1 resource(s) marked delete? [y/N]: aborted\n"
    monkeypatch.setattr(sys, "stdin", _Terminal(""))  # a question would read no answer: no
    code, out, err = gc("--yes", "--min-age", "120")  # too young: kept, nothing to ask
    assert code == 0 and out.endswith("deleted 0 resource(s), kept 1\n") and node.exists()
    code, out, err = gc("--yes")
    assert code == 0 and out.endswith("deleted 1 resource(s), kept 0\n"), out + err
    assert not node.exists()
