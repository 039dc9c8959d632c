"""A provider registered only through the `mlcloud.providers` entry point (a distribution of
its own on the path, as `pip install mlcloud-toy` would leave it) is one like the built-ins:
`gc` finds and deletes what it holds, `doctor --rebuild` recovers its clusters, `down` ends
them."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli

TOY = '''
"""Nodes are directories under $MLCLOUD_HOME/toy/<uid>/, each cluster's owner in a file."""

import os
import shutil
import sys
from pathlib import Path

from mlcloud.providers.base import Capabilities, Node, Prepared, Resource
from mlcloud.remote.local import LocalTransport


def base():
    return Path(os.environ["MLCLOUD_HOME"]) / "toy"


class ToyProvider:
    name = "toy"
    boot_timeout = 0.0
    capabilities = Capabilities()
    pythons = (sys.executable,)

    def default_region(self):
        return None

    def configured(self):
        return True

    def placements(self, request):
        return [(None, None)]

    def check(self, request):
        pass

    def prepare(self, cluster, request):
        return Prepared(request)

    def create(self, cluster, request, count):
        have = len(self.list(cluster))
        for i in range(have, have + count):
            (base() / cluster.uid / f"node-{i}").mkdir(parents=True)
        (base() / cluster.uid / "owner").write_text(cluster.owner)
        return self.list(cluster)[have:]

    def list(self, cluster):
        return [
            Node(f"toy-{p.name}", "127.0.0.1", "127.0.0.1", str(p))
            for p in sorted((base() / cluster.uid).glob("node-*"))
        ]

    def spares(self, cluster):
        return None

    def terminate(self, cluster, nodes):
        for n in nodes:
            shutil.rmtree(n.root)

    def cleanup(self, cluster):
        shutil.rmtree(base() / cluster.uid, ignore_errors=True)

    def transport(self, cluster, node, label, ssh):
        return LocalTransport(label)

    def discover(self, region):
        return [
            Resource(
                "toy",
                "node",
                f"{p.parent.name}/{p.name}",
                p.parent.name,
                p.parent.name.rsplit("-", 1)[0],
                (p.parent / "owner").read_text(),
                "",
                created=p.stat().st_mtime,
            )
            for p in sorted(base().glob("*/node-*"))
        ]

    def delete(self, resources):
        for r in resources:
            shutil.rmtree(base() / r.id)
            if not list((base() / r.cluster_uid).glob("node-*")):
                shutil.rmtree(base() / r.cluster_uid)

    def recorded(self, cluster):
        return None

    def prices(self, pairs):
        return {}

    def quotes(self, pairs, spot):
        return []
'''


@pytest.fixture
def toy(tmp_path, monkeypatch, mlcloud_home):
    """The plugin installed where the CLI's Python finds it; no cloud credentials here."""
    site = tmp_path / "site"
    dist = site / "mlcloud_toy-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "toy_provider.py").write_text(TOY)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlcloud-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mlcloud.providers]\ntoy = toy_provider:ToyProvider\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.environ["PYTHONPATH"], str(site)]))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(mlcloud_home / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(mlcloud_home / "none"))
    return mlcloud_home / "toy"


def held(toy_home, uid: str, nodes: int, owner: str) -> None:
    """What the plugin holds for a cluster that state does not know."""
    for i in range(nodes):
        (toy_home / uid / f"node-{i}").mkdir(parents=True)
    (toy_home / uid / "owner").write_text(owner)


def home_id() -> str:
    from mlcloud.state import paths

    return paths.home_id()


def test_gc_finds_and_deletes_what_a_plugin_holds(toy):
    held(toy, "lost-0a1b2c3d", 2, home_id())
    r = run_cli("gc", "--json")  # no --provider: every registered one
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [s.split(":")[0] for s in out["skipped"]] == ["aws", "gce"]  # no credentials here
    assert sorted((o["provider"], o["id"], o["cluster_name"]) for o in out["orphans"]) == [
        ("toy", "lost-0a1b2c3d/node-0", "lost"),
        ("toy", "lost-0a1b2c3d/node-1", "lost"),
    ]
    r = run_cli("gc", "--provider", "toy", "--yes", "--min-age", "0", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["deleted"] == 2, r.stderr
    assert not (toy / "lost-0a1b2c3d").exists()


def test_doctor_rebuilds_a_plugins_cluster_that_down_then_ends(toy):
    held(toy, "kept-0a1b2c3d", 2, home_id())
    held(toy, "theirs-99aa88bb", 1, "another-home")
    r = run_cli("doctor", "--rebuild", "--yes", "--json")  # no -p: every registered provider
    report = json.loads(r.stdout)
    rebuilt = report["rebuild"]
    # the clouds without credentials are skipped and named; all that could be searched was
    assert rebuilt["unsearched"] == [] and r.returncode == 0, r.stderr
    assert [s.split(":")[0] for s in rebuilt["skipped"]] == ["aws", "gce"]
    assert [(c["name"], c["uid"], c["provider"], c["nodes"]) for c in rebuilt["clusters"]] == [
        ("kept", "kept-0a1b2c3d", "toy", 2)
    ]
    assert any(
        n.startswith("toy: cluster theirs (theirs-99aa88bb) belongs to another home")
        for n in rebuilt["notes"]
    )
    nodes = [c for c in report["checks"] if c["area"] == "nodes"]
    assert [c["detail"] for c in nodes] == ["reachable"] * 2
    status = json.loads(run_cli("status", "--json").stdout)["clusters"]
    assert [(c["name"], c["provider"], len(c["nodes"])) for c in status] == [("kept", "toy", 2)]
    r = run_cli("down", "kept", "--yes")
    assert r.returncode == 0, r.stderr
    assert not (toy / "kept-0a1b2c3d").exists() and (toy / "theirs-99aa88bb").exists()
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
