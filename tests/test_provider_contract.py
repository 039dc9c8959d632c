"""The Provider contract is whole: every built-in has every member with the Protocol's
parameters and declares its capabilities; the engine reads those, not provider names."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import tagged_pids
from mlcloud.providers.base import Capabilities, ClusterRef, Node, Provider
from mlcloud.providers.local import LocalProvider

from mlcloud import providers, state
from mlcloud.errors import UsageError
from mlcloud.provision import handle, lifecycle
from mlcloud.report import PlainReporter
from mlcloud.spec.task import TaskSpec

MEMBERS = sorted(
    name for name, value in vars(Provider).items() if callable(value) and not name.startswith("_")
)


@pytest.mark.parametrize("name", ["local", "ssh", "aws", "gce"])
def test_every_builtin_has_every_member_with_the_protocols_parameters(name):
    p = providers.get(name)
    assert isinstance(type(p).capabilities, Capabilities)
    assert isinstance(p.name, str) and isinstance(p.boot_timeout, float)
    assert type(p).pythons and all(isinstance(x, str) for x in type(p).pythons)
    assert {"default_region", "discover", "delete", "prices", "transport"} <= set(MEMBERS)
    assert {"spares", "recorded"} <= set(MEMBERS)
    for member in MEMBERS:
        want = list(inspect.signature(getattr(Provider, member)).parameters)
        have = list(inspect.signature(getattr(type(p), member)).parameters)
        assert have == want, f"{name}.{member}{have} is not the Protocol's {want}"
        for param in inspect.signature(getattr(type(p), member)).parameters.values():
            assert param.default is inspect.Parameter.empty or param.name == "self", (
                f"{name}.{member}: {param.name} has a default the Protocol lacks"
            )


def test_capabilities_as_declared():
    assert [f.name for f in fields(Capabilities)] == ["spot", "self_deadline", "owns_machines"]
    local, ssh, aws = (type(providers.get(n)).capabilities for n in ("local", "ssh", "aws"))
    assert local == ssh == Capabilities()
    assert aws.owns_machines and aws.spot and not aws.self_deadline
    gce = type(providers.get("gce")).capabilities
    assert gce.owns_machines and gce.spot and gce.self_deadline
    assert providers.get("local").prices([("x", "y")]) == {}
    assert providers.get("ssh").quotes([("x", "y")], True) == []
    assert providers.get("local").pythons == (sys.executable,)  # the nodes are this machine


ROOT = Path(__file__).resolve().parent.parent
BUILTIN = r"[\"'](?:local|ssh|aws|gce)[\"']"
# A provider asked what it has instead of the contract telling (h.provider, p)
PROBES = [
    re.compile(r"\b(?:has|get)attr\(\s*(?:[\w.]+\.)?provider\s*,"),
    re.compile(r"\b(?:has|get)attr\(\s*providers\.get\("),
    re.compile(r"\bhasattr\(\s*p\s*,"),
]
# A decision by a provider's name: `provider.name == ...`, `p == "local"`, `.provider != "ssh"`,
# `.name in ("aws", ...)`, `LOCAL = ("local", "ssh")`; the catalog's rows are keyed by provider
# name, which decides nothing
NAME_CHECKS = [
    re.compile(r"\bgetattr\(\s*p\s*,"),  # the engine's p is a provider (cli's: a click option)
    re.compile(r"\bprovider\.name\s*(?:==|!=|in\b|not\s+in\b)"),
    re.compile(rf"(?:==|!=)\s*{BUILTIN}"),
    re.compile(rf"{BUILTIN}\s*(?:==|!=)"),
    re.compile(rf"(?:\.name|\bprovider|\bp)\s+(?:not\s+)?in\s*[(\[{{]\s*{BUILTIN}"),
    re.compile(rf"[(\[{{]\s*{BUILTIN}\s*,\s*{BUILTIN}"),  # a list of them to check against
]
CATALOG = ROOT / "mlcloud" / "spec" / "catalog"


def _hits(patterns: list[re.Pattern], folders: tuple[str, ...]) -> list[str]:
    return [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for folder in folders
        for f in sorted((ROOT / folder).rglob("*.py"))
        if CATALOG not in f.parents
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if any(p.search(line) for p in patterns)
    ]


def test_nothing_probes_a_provider_or_checks_its_name():
    assert _hits(PROBES, ("mlcloud", "cli")) == []
    assert _hits(NAME_CHECKS, ("mlcloud",)) == []
    for folder in ("mlcloud", "cli"):
        for f in (ROOT / folder).rglob("*.py"):
            assert "Collector" not in f.read_text(), f


@pytest.mark.parametrize(
    "line",
    [
        'spares = getattr(h.provider, "spares", None)',
        'if hasattr(p, "discover"):',
        'getattr(providers.get(name), "spot_prices")',
        'else (t.python,) if provider.name == "local" else PYTHON_CANDIDATES',
        'if h.provider.name in ("aws", "gce"):',
        'if p == "local":',
        'elif rec.provider != "ssh":',
        'if "gce" == name:',
        'if provider in ("local", "ssh"):',
        'CLOUDS = ("local", "ssh", "aws", "gce")',
    ],
)
def test_the_probe_patterns_catch_probes(line):
    assert any(p.search(line) for p in PROBES + NAME_CHECKS), line


@pytest.mark.parametrize(
    "line",
    [
        'mark = getattr(e, "problem_mark", None)',
        'event = getattr(_worker, "cancel", None)',
        "if existing.provider != provider.name:",
        'f"preparing {provider.name} resources for {ref.name}"',
        'METADATA = {"aws": "http://169.254.169.254", "gce": "http://metadata.google.internal"}',
        'PRIVATE = ("keys", "ssh", "locks", "logs")',
        'for scheme, cloud, lookup in (("s3", "aws", _s3_region), ("gs", "gce", _gcs_region)):',
        'if not {"ssh", "root", "python"} <= found.keys():',
    ],
)
def test_the_probe_patterns_leave_other_code_alone(line):
    assert not any(p.search(line) for p in PROBES + NAME_CHECKS), line


def test_spot_is_refused_where_the_provider_has_none():
    spec = TaskSpec(provider="local", nodes=1, spot=True)
    with pytest.raises(UsageError, match="the local provider has no spot nodes"):
        lifecycle.up(state.open_store(), "nospot", spec, PlainReporter(quiet=True))
    assert state.open_store().get_cluster("nospot") is None


class _Plain(LocalProvider):
    """A provider whose terminate only removes what it holds, as the contract asks."""

    def terminate(self, cluster: ClusterRef, nodes: list[Node]) -> None:
        import shutil

        for n in nodes:
            shutil.rmtree(n.root)


def test_the_engine_stops_the_processes_on_machines_it_does_not_own(monkeypatch, mlcloud_home):
    plain = _Plain()
    monkeypatch.setattr("mlcloud.providers.get", lambda name: plain)
    store = state.open_store()
    rec = lifecycle.up(
        store, "procs", TaskSpec(provider="local", nodes=2), PlainReporter(quiet=True)
    )
    job = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"],
        env={**os.environ, "MLCLOUD_PROC_TAG": f"{rec.uid}.1.1."},
    )
    try:
        lifecycle.down(store, "procs", PlainReporter(quiet=True))
        assert job.wait(timeout=15) is not None  # stopped by tag, by the engine
        assert tagged_pids(f"{rec.uid}.") == []
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()


def test_a_node_added_later_has_its_agent_tag_its_own_processes(mlcloud_home):
    """The agent stops the processes tagged as launch tags its node's jobs (by its node-K
    directory): a node added after node 0 must not stop node 0's on a shared machine."""
    import json

    store = state.open_store()
    rep = PlainReporter(quiet=True)
    rec = lifecycle.up(store, "grow", TaskSpec(provider="local", nodes=1), rep)
    h = handle.open_cluster(store, "grow")
    try:
        (new,) = lifecycle.add_nodes(store, h, 1, rep).records
        conf = json.loads((Path(new.root) / "agent" / "config.json").read_text())
        assert conf["tag"] == f"{rec.uid}.1."
        assert conf["node"] == 1  # its own number, not its place in the batch it came in
    finally:
        h.close()
        lifecycle.down(store, "grow", rep)
