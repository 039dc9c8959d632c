"""Shared fixtures: every test gets its own MLCLOUD_HOME, so none touches real state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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

# A run started in the background of a shell inherits SIGINT ignored, and so would every
# process the tests start (Python then has no KeyboardInterrupt): tests of Ctrl-C need it back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Parallel workers (pytest-xdist's gw0, gw1, ...) never share a loopback block for sshd nodes
# (127.0.10+N.x; 127.0.0.x without xdist) nor a network namespace name or subnet (nsbridge).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
WORKER_INDEX = int(WORKER[2:]) if WORKER[2:].isdigit() else -1
SSH_NET = f"127.0.{10 + WORKER_INDEX}" if WORKER_INDEX >= 0 else "127.0.0"
os.environ["SSHNODES_NET"] = SSH_NET

# The torchrun stand-in (torchrun_standin.py): node_ctl runs it in torchrun's place where the
# node's environment names it. Every test gets it but those marked real_torchrun.
TORCHRUN_STANDIN = str(Path(__file__).parent / "torchrun_standin.py")
STANDIN_VAR = "MLCLOUD_TEST_TORCHRUN"


# Fixtures that start real daemons: a test using one is end-to-end (`make test-fast` skips it).
E2E_FIXTURES = {"make_ssh_nodes", "moto_server", "pg_server", "pg_url"}


def pytest_sessionstart(session):
    """mlcloud's own modules compiled once, before the run: the suite starts hundreds of
    `mlcloud` processes, and an editable install under PYTHONDONTWRITEBYTECODE (set on many CI
    runners) would have each compile them again (~0.1 s of CPU a process). Where the sources
    change later, Python sees the stale bytecode and compiles as before."""
    if hasattr(session.config, "workerinput"):  # xdist's controller did it
        return
    import compileall

    root = Path(__file__).parent.parent
    for package in ("mlcloud", "cli", "providers"):
        compileall.compile_dir(root / package, quiet=1)


def pytest_collection_modifyitems(items):
    for item in items:
        # a test of both stores asks for the server in its postgresql case (`kind` fixtures)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())) or "postgresql" in params.values():
            item.add_marker(pytest.mark.e2e)
    _longest_first(items)


def _longest_first(items) -> None:
    """The modules with the slowest tests of a past run first (tests/slowest.txt), then those
    with end-to-end tests (by how many), then the rest: xdist hands tests out in this order,
    so the long ones start first and the short ones fill the gaps at the end instead of one
    long test ending the run alone. A module's tests stay together, so its module-scoped
    fixtures (sshd fleets) start once."""
    measured: dict[str, float] = {}
    for line in (Path(__file__).parent / "slowest.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            seconds, nodeid = line.split(" ", 1)
            module = nodeid.split("::")[0]
            measured[module] = max(measured.get(module, 0.0), float(seconds.rstrip("s")))
    e2e: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        e2e[module] = e2e.get(module, 0) + (1 if item.get_closest_marker("e2e") else 0)
    items.sort(key=lambda item: (-measured.get(m := item.nodeid.split("::")[0], 0.0), -e2e[m]))


def real_torchrun(request) -> bool:
    return request.node.get_closest_marker("real_torchrun") is not None


@pytest.fixture(autouse=True)
def torchrun_standin(request, monkeypatch):
    """Jobs on local nodes (which inherit the CLI's environment) run the torchrun stand-in,
    unless the test is marked real_torchrun; ssh fleets get it through sshd (make_ssh_nodes)."""
    if real_torchrun(request):
        monkeypatch.delenv(STANDIN_VAR, raising=False)
    else:
        monkeypatch.setenv(STANDIN_VAR, TORCHRUN_STANDIN)


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


# Commands the suite runs hundreds of times whose process is not what the test looks at (it
# looks at state, nodes, output): run through the console script's own function in this
# process (run_cli_in_process), ~0.2-0.4 s of CPU each saved. They stay processes where this
# process is not the CLI's any more: on a shared store (MLCLOUD_STATE_URL; tests stop that
# server under them), from a thread of the test, in a test that monkeypatched an attribute
# or changed PATH or PYTHONPATH, and with --detach (the driver it starts is reaped when the
# CLI's process ends: here it would stay a zombie, "still following").
IN_PROCESS = {
    "status",
    "up",
    "down",
    "gc",
    "init",
    "events",
    "logs",
    "jobs",
    "doctor",
    "pull",
    "exec",
    "cancel",
    "train",
}
_in_process_turn = threading.Lock()  # one at a time: they swap this process's stdout
_test_patches: list = [None]  # the running test's monkeypatch
# what a process reads when it starts (the commands it finds, the modules and plugins it
# imports): a test that changed them gets a process
_AT_START = {k: os.environ.get(k) for k in ("PATH", "PYTHONPATH")}


@pytest.fixture(autouse=True)
def _record_patches(monkeypatch):
    _test_patches[0] = monkeypatch


def _runs_in_process(args: tuple[str, ...], kw: dict) -> bool:
    patch = _test_patches[0]
    return (
        bool(args)
        and args[0] in IN_PROCESS
        and "--detach" not in args  # its driver is reaped when the CLI's process ends
        and set(kw) <= {"cwd", "input"}
        and "MLCLOUD_STATE_URL" not in os.environ
        and threading.current_thread() is threading.main_thread()
        and not (patch is not None and patch._setattr)  # pytest keeps them there to undo
        and all(os.environ.get(k) == v for k, v in _AT_START.items())
    )


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """The real `mlcloud` process, no terminal, environment of the test (MLCLOUD_HOME); in
    this process for the commands in IN_PROCESS."""
    if _runs_in_process(args, kw):
        with _in_process_turn:
            return run_cli_in_process(*args, timeout=timeout, **kw)
    return subprocess.run(
        [MLCLOUD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ),
        **kw,
    )


# The DDP template with a pause per step until the file SLOW_UNTIL names exists (the nodes
# share this machine's disk): a job long enough to lose a node mid-run, whose steps left after
# the loss was seen run at full speed; with no SLOW_UNTIL, a job that runs until it is stopped
# without taking a core of this 2-core machine meanwhile. Tests write it beside train.py as
# slow.py.
SLOW_TRAIN = """\
import os
import time

import train

_batch = train.make_batch
_until = os.environ.get("SLOW_UNTIL")


def make_batch(*args, **kwargs):
    if not (_until and os.path.exists(_until)):
        time.sleep(0.1)
    return _batch(*args, **kwargs)


train.make_batch = make_batch
train.main()
"""


def on_a_terminal(args: list[str], answer: str) -> subprocess.CompletedProcess:
    """The real CLI with a terminal as stdin, the answer typed ahead."""
    master, slave = os.openpty()
    try:
        os.write(master, answer.encode() + b"\n")
        return subprocess.run(
            [MLCLOUD, *args],
            stdin=slave,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ),
        )
    finally:
        os.close(slave)
        os.close(master)


def run_cli_in_process(
    *args: str, cwd: Path | None = None, input: str | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """The console script's own function (mlcloud.cli.app.run: every way a command ends becomes
    its exit code and one error line) in this process, for tests whose subject is a command's
    message and exit code, not its process: the same argv and environment (os.environ), stdin
    not a terminal (`input` or nothing), stdout and stderr captured. ~100x cheaper than
    starting `mlcloud`; what a command changes of this process is put back. It runs in a
    thread of its own, so a command that hangs fails the test after `timeout` as a process
    would (subprocess.TimeoutExpired)."""
    import gc
    import io
    import logging

    from mlcloud.cli import app

    def stream() -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    saved_levels = {n: logging.getLogger(n).level for n in app.QUIET_LOGGERS}
    # a fresh interpreter's logging: no handler (pytest's are set aside), so a record a library
    # logs reaches stderr through logging.lastResort, as it would from the real process
    root = logging.getLogger()
    saved_handlers, root.handlers = root.handlers, []
    out, err = stream(), stream()
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(input or ""), out, err
    try:
        if cwd is not None:
            os.chdir(cwd)
        ended: list = []

        def command() -> None:
            try:
                ended.append(app.run(list(args)))
            except BaseException as e:  # noqa: BLE001 (raised again below, in the test)
                ended.append(e)

        th = threading.Thread(target=command, name="mlcloud " + " ".join(args[:1]), daemon=True)
        th.start()
        th.join(timeout)
        if not ended:
            raise subprocess.TimeoutExpired(["mlcloud", *args], timeout or 0)
        if isinstance(ended[0], BaseException):
            raise ended[0]
        code = ended[0]
    finally:
        gc.collect(1)  # what the command left for its exit to close (a database connection)
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        root.handlers = saved_handlers
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
    text = [s.buffer.getvalue().decode(errors="replace") for s in (out, err)]
    return subprocess.CompletedProcess(["mlcloud", *args], code, text[0], text[1])


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


def _has_clusters(home: Path) -> bool:
    """Whether the test's state still holds a cluster (then `down --all --purge` is due)."""
    import sqlite3

    if (home / "ssh").is_dir() and any((home / "ssh").glob("*.json")):
        return True
    if not (home / "state.db").exists():
        return False
    try:
        db = sqlite3.connect(home / "state.db")
        try:
            return db.execute("SELECT COUNT(*) FROM clusters").fetchone()[0] > 0
        finally:
            db.close()
    except sqlite3.Error:
        return True  # unreadable: let `down` judge


class SshFleets:
    """A module's sshd fleets, kept from test to test: a test's n-th `make_ssh_nodes(K, **kw)`
    gets the same fleet as the previous test's n-th call with the same K and options. Tests
    stay apart by cluster uid (a node's directories are ~/.mlcloud/UID/node-K) and by their
    own $MLCLOUD_HOME (keys, known hosts, state); after each test its clusters go down and the
    fleet is reset (sshnodes.SshNodes.reset: sessions ended, lost nodes back)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.fleets: dict[tuple, object] = {}

    def get(self, key: tuple, count: int, kw: dict):
        from sshnodes import SshNodes

        nodes = self.fleets.get(key)
        if nodes is None:
            nodes = SshNodes(count, self.workdir / f"fleet{len(self.fleets)}", **kw)
            nodes.start()
            self.fleets[key] = nodes
        return nodes

    def close(self) -> None:
        for nodes in self.fleets.values():
            nodes.stop()
        self.fleets.clear()


@pytest.fixture(scope="module")
def ssh_fleets(tmp_path_factory):
    fleets = SshFleets(tmp_path_factory.mktemp("sshd"))
    yield fleets
    fleets.close()  # every sshd and session process, by PID


@pytest.fixture
def make_ssh_nodes(ssh_fleets, mlcloud_home, request):
    """K real OpenSSH daemons on this worker's loopback block (127.0.0.2.. without xdist) as
    nodes, from the module's kept fleets; this test's clusters are taken down after it."""
    used: list = []
    standin = () if real_torchrun(request) else (f"{STANDIN_VAR}={TORCHRUN_STANDIN}",)

    def make(count: int, **kw):
        kw = {**kw, "extra_env": tuple(kw.get("extra_env", ())) + standin}
        key = (len(used), count, tuple(sorted(kw.items())))
        nodes = ssh_fleets.get(key, count, kw)
        used.append(nodes)
        return nodes

    yield make
    # whatever a failed test left on the nodes goes now. They live in this user's real home
    # (~/.mlcloud/UID), shared with other test runs: only this test's clusters' are removed.
    uids = _cluster_uids(mlcloud_home)
    if _has_clusters(mlcloud_home):
        run_cli("down", "--all", "--yes", "--purge")
    for nodes in used:
        nodes.reset()
    import shutil

    for uid in uids - {""}:
        shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)


def wait_for(cond, timeout: float = 60.0, what: str = "", out=lambda: "", every=0.1) -> None:
    """Poll `cond` until it holds; past `timeout` fail, naming `what` and `out()`."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}: {out()}"
        time.sleep(every)


def relayed_node_args(nodes, proxy: str) -> list[str]:
    """The flags that reach a fake cloud's instances: loopback sshd nodes through the relay."""
    return [
        "--identity", str(nodes.client_key), "--ssh-user", nodes.user,
        "--ssh-port", str(nodes.port), "--proxy-command", proxy,
        "--allow-ssh-from", "127.0.0.1/32",
    ]  # fmt: skip


def cli_process(argv: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`mlcloud ARGV` as a process of its own, stdout and stderr together, no stdin."""
    return subprocess.Popen(
        [MLCLOUD, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, cwd=cwd, env=env or dict(os.environ),
    )  # fmt: skip


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


@pytest.fixture(scope="session")
def moto_session_server():
    """One plain moto server on loopback for the whole run (each xdist worker its own)."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.ERROR)  # one line per request otherwise
    # the server's own records (an action moto lacks) reach pytest's capture, never stderr
    # through logging's last resort: stderr is a command's while it runs in this process
    werkzeug.addHandler(logging.NullHandler())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ec2_stand_in(moto_session_server):
    """The run's moto server behind an EC2 stand-in with real idempotency (a ClientToken seen
    before launches nothing and answers as the first time: tests/fakes/ec2_tokens.py)."""
    from fakes.ec2_tokens import Ec2Tokens

    stand_in = Ec2Tokens(moto_session_server)
    yield stand_in
    stand_in.close()


@pytest.fixture
def moto_server(ec2_stand_in, aws_env, monkeypatch):
    """A plain moto server on loopback, as users' CI runs it (no placement groups: it answers
    those calls with an HTML 500), reached through the idempotency stand-in; the CLI reaches it
    through AWS_ENDPOINT_URL. The run's one server, emptied for each test (moto's reset
    endpoint, which empties the stand-in's tokens too)."""
    import urllib.request

    url = ec2_stand_in.url
    req = urllib.request.Request(f"{url}/moto-api/reset", data=b"", method="POST")
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(req, timeout=30) as r:
        assert r.status == 200
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    return url


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


# ---- PostgreSQL: one real server per test run (per xdist worker), a database per test ------


@pytest.fixture(scope="session")
def pg_server():
    from pgserver import PgServer

    server = PgServer()
    yield server
    server.close()


@pytest.fixture
def pg_url(pg_server, mlcloud_home, monkeypatch) -> Iterator[str]:
    """A database of this test's own on the worker's server, chosen as the state store
    (MLCLOUD_STATE_URL) for this process and the commands it starts; the server is started
    again if a test stopped it. The local clusters a failed test left in it go down after it,
    from the test's home, where their nodes run."""
    if pg_server.proc is None or pg_server.proc.poll() is not None:
        pg_server.start()
    url = pg_server.database()
    monkeypatch.setenv("MLCLOUD_STATE_URL", url)
    yield url
    left = _local_clusters(url)
    if left:
        env = dict(os.environ, MLCLOUD_STATE_URL=url, MLCLOUD_HOME=str(mlcloud_home))
        subprocess.run(
            [MLCLOUD, "down", *left, "--yes", "--purge"],
            env=env,
            capture_output=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )


def _local_clusters(url: str) -> list[str]:
    """The local clusters the test's database still holds with a node on disk (not the rows
    tests write by hand; none if the server is gone)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as db:
            rows = db.execute(
                "SELECT c.name, n.root FROM clusters c JOIN nodes n ON n.cluster = c.name "
                "WHERE c.provider = 'local'"
            ).fetchall()
    except psycopg.Error:
        return []
    return sorted({name for name, root in rows if os.path.isdir(root)})


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
    "MLCLOUD_GCE_IAM_ENDPOINT",
    "STORAGE_EMULATOR_HOST",
):
    os.environ.pop(_var, None)
os.environ["NO_GCE_CHECK"] = "true"
os.environ["GCE_METADATA_HOST"] = os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
os.environ["CLOUDSDK_CONFIG"] = str(Path(__file__).parent / "data" / "no-gcloud-config")
from gce_fixtures import gce_env, gce_fake, gce_fake_process  # noqa: E402,F401

E2E_FIXTURES |= {"gce_fake", "gce_fake_process"}
# ---- end GCE ----------------------------------------------------------------------------
