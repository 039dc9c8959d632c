"""Shared fixtures: every test gets its own MLCLOUD_HOME, so none touches real state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MLCLOUD = str(Path(sys.executable).parent / "mlcloud")
# The network guard (netguard/sitecustomize.py): this process and every Python process the
# tests start refuse to leave loopback or ask a resolver, and the test that tried fails.
_GUARD = Path(__file__).parent / "netguard"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(_GUARD), os.environ.get("PYTHONPATH", "")) if p
)
sys.path.insert(0, str(_GUARD))
import sitecustomize as _netguard  # noqa: E402  (ours: the first on the path)

_netguard.install()
# moto reads its AMI list when first imported: ours has Deep Learning AMIs to find.
os.environ["MOTO_AMIS_PATH"] = str(Path(__file__).parent / "data" / "amis.json")
# never ask an instance metadata service (169.254.169.254) for credentials
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
# the node agents of emulated cloud nodes (sshd on this machine) ask a closed loopback port,
# never the real metadata servers; tests of preemption notices point them at a stand-in
os.environ["MLCLOUD_METADATA_AWS"] = "http://127.0.0.1:9"
os.environ["MLCLOUD_METADATA_GCE"] = "http://127.0.0.1:9"


# Fixtures that start real daemons: a test using one is end-to-end (`make test-fast` skips it).
E2E_FIXTURES = {"make_ssh_nodes", "moto_server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def network_guard(tmp_path, monkeypatch):
    """Fail any test whose processes tried to reach beyond loopback or resolve a name."""
    log = tmp_path / "netguard.log"
    monkeypatch.setenv("MLCLOUD_NETGUARD_LOG", str(log))
    yield
    if log.exists() and log.read_text().strip():
        pytest.fail("network guard: tried to leave loopback:\n" + log.read_text())


@pytest.fixture(autouse=True)
def mlcloud_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "mlcloud-home"
    monkeypatch.setenv("MLCLOUD_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    # The tests' own environment, not this machine's: PYTHONUNBUFFERED makes print() write
    # text and newline apart, which no user's job should depend on either way.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    # After a node's job fails, the others run on this long before they are stopped (15 s by
    # default; torchrun can sit in its exit barrier meanwhile): the same path at a test's pace.
    monkeypatch.setenv("MLCLOUD_FAIL_GRACE", "3")
    return home


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """The real `mlcloud` process, no terminal, environment of the test (MLCLOUD_HOME)."""
    return subprocess.run(
        [MLCLOUD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ),
        **kw,
    )


def tagged_pids(prefix: str) -> list[int]:
    """Live processes whose MLCLOUD_PROC_TAG starts with prefix (how node_ctl finds them)."""
    want = f"MLCLOUD_PROC_TAG={prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if any(e.startswith(want) for e in env):
            found.append(int(entry))
    return found


def _cluster_uids(home: Path) -> set[str]:
    """The uids of the clusters a test's home knows (state, and the ssh provider's files)."""
    import sqlite3

    uids = {p.stem for p in (home / "ssh").glob("*.json")}
    if (home / "state.db").exists():
        try:
            db = sqlite3.connect(home / "state.db")
            # events and billing keep the uid after `down` dropped the cluster's row
            for table in ("clusters", "events", "billing"):
                uids |= {r[0] for r in db.execute(f"SELECT uid FROM {table}")}  # noqa: S608
            db.close()
        except sqlite3.Error:
            pass
    return uids


@pytest.fixture
def make_ssh_nodes(tmp_path, mlcloud_home):
    """Start K real OpenSSH daemons on 127.0.0.2.. as nodes; all stopped (by PID) after the test."""
    from sshnodes import SshNodes

    started: list[SshNodes] = []

    def make(count: int, **kw) -> SshNodes:
        nodes = SshNodes(count, tmp_path / f"sshd{len(started)}", **kw)
        nodes.start()
        started.append(nodes)
        return nodes

    yield make
    # whatever a failed test left on the nodes goes now. They live in this user's real home
    # (~/.mlcloud/UID), shared with other test runs: only this test's clusters' are removed.
    uids = _cluster_uids(mlcloud_home)
    run_cli("down", "--all", "--yes", "--purge")
    for nodes in started:
        nodes.stop()
    import shutil

    for uid in uids - {""}:
        shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)


def ssh_up_args(nodes, name: str) -> list[str]:
    return [
        "up",
        name,
        "--hosts",
        ",".join(n.target for n in nodes.nodes),
        "--identity",
        str(nodes.client_key),
    ]


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Fake credentials and region, no profile or config from this machine."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def moto_server(aws_env, monkeypatch):
    """A plain moto server on loopback, as users' CI runs it (no placement groups: it answers
    those calls with an HTML 500); the CLI reaches it through AWS_ENDPOINT_URL."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    yield url
    server.stop()


def relay_pool(tmp_path, hosts: list[str]) -> tuple[Path, str]:
    """(pool file, proxy command) routing cloud addresses to loopback sshd nodes."""
    import json

    pool = tmp_path / "routes.json"
    pool.write_text(json.dumps({"pool": hosts, "routes": {}}))
    relay = Path(__file__).parent / "tcp_relay.py"
    return pool, f"{sys.executable} {relay} --pool {pool} %h %p"


@pytest.fixture
def small_disk(tmp_path):
    """A file system that fills up: a 1 MiB tmpfs for this test (root only, else skipped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


# ---- GCE: the fake Compute API (tests/fakes/, fixtures in tests/gce_fixtures.py) ----------
# google-auth with nothing configured asks the GCE metadata server (169.254.169.254 and
# metadata.google.internal) and reads gcloud's files: in tests it finds neither, it only reads
# what a test configures.
for _var in (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
    "CLOUDSDK_CORE_PROJECT",
    "MLCLOUD_GCE_API_ENDPOINT",
):
    os.environ.pop(_var, None)
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
os.environ["CLOUDSDK_CONFIG"] = str(Path(__file__).parent / "data" / "no-gcloud-config")
from gce_fixtures import gce_env, gce_fake, gce_fake_process  # noqa: E402,F401

E2E_FIXTURES |= {"gce_fake", "gce_fake_process"}
# ---- end GCE ----------------------------------------------------------------------------
