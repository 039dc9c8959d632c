"""The `mlcloud` command line on bad input: one `error:` line on stderr (click's usage errors
too), the right exit code, no traceback, nothing created. The cases run the console script's
own function in-process (conftest.run_cli_in_process: the message and the exit code are the
subject, not the process); a run of them, and a real cluster's, go through the real console
script as a subprocess too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli_in_process

import mlcloud

MLCLOUD = Path(sys.executable).parent / "mlcloud"
EMPTY = {"schema": 1, "clusters": []}


def run(
    args: list[str],
    home: Path,
    cwd: Path,
    *,
    stdin: int | None = subprocess.DEVNULL,
    input: str | None = None,
    timeout: float = 20,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLCLOUD_HOME": str(home), "NO_COLOR": "1"}
    env.pop("MLCLOUD_DEBUG", None)
    return subprocess.run(
        [str(MLCLOUD), *args],
        env=env,
        cwd=cwd,
        stdin=None if input is not None else stdin,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,  # a prompt that waits for a terminal would hang here
    )


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def cli_process(tmp_path, home):
    """Run the real mlcloud process in tmp_path with its own MLCLOUD_HOME; `{tmp}` in an
    argument is tmp_path."""

    def call(*args: str, **kw) -> subprocess.CompletedProcess:
        return run([a.replace("{tmp}", str(tmp_path)) for a in args], home, tmp_path, **kw)

    return call


@pytest.fixture
def cli(tmp_path, home, monkeypatch):
    """As cli_process, in this process (conftest.run_cli_in_process)."""
    monkeypatch.setenv("MLCLOUD_HOME", str(home))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("MLCLOUD_DEBUG", raising=False)

    def call(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
        return run_cli_in_process(*argv, cwd=tmp_path, input=input)

    return call


def clusters(cli) -> dict:
    """What `mlcloud status --json` shows."""
    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cluster_names(home: Path) -> list[str]:
    """The clusters in state, read in-process: the per-case check, ~100x cheaper than
    `status --json` (which test_failed_commands_leave_status_empty runs for real)."""
    from mlcloud.state import Store

    db = home / "state.db"
    if not db.exists():
        return []
    store = Store(db)
    try:
        return [c.name for c in store.list_clusters()]
    finally:
        store.close()


def assert_one_error_line(r: subprocess.CompletedProcess, code: int, words: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {r.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert words in lines[0], lines[0]
    assert r.stdout == ""
    return lines[0]


@pytest.fixture
def workdir(tmp_path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text("print('hi')\n")
    return work


# (id, argv, exit code, words in the error line); {tmp} is the test's directory, whose
# work/ holds a train.py.
ERRORS = [
    ("up-underscore", ["up", "Bad_Name"], 2, "invalid cluster name 'Bad_Name'"),
    ("up-digit-first", ["up", "1abc"], 2, "a letter first"),
    ("up-too-long", ["up", "a" * 41], 2, "at most 40 characters"),
    ("up-hyphen-end", ["up", "abc-"], 2, "not ending in a hyphen"),
    ("up-uppercase", ["up", "Abc"], 2, "invalid cluster name"),
    ("up-no-name", ["up"], 2, "name the cluster"),
    ("up-nodes-zero", ["up", "ok", "--nodes", "0"], 2, "--nodes: must be 1 or more"),
    ("up-nodes-negative", ["up", "ok", "-n", "-3"], 2, "--nodes"),
    ("up-unknown-provider", ["up", "ok", "--provider", "nope"], 2, "unknown provider 'nope'"),
    ("up-missing-spec", ["up", "ok", "-f", "{tmp}/nope.yaml"], 2, "not found"),
    ("down-bad-name", ["down", "Bad_Name", "--yes"], 2, "invalid cluster name"),
    ("down-neither", ["down"], 2, "--all"),
    ("down-both", ["down", "ok", "--all", "--yes"], 2, "not both"),
    ("down-typo", ["down", "typo"], 1, "no cluster named 'typo'"),  # not_found, nothing asked
    (
        "train-unknown-cluster",
        ["train", "ghost", "train.py", "-w", "{tmp}/work"],
        1,
        "no cluster named 'ghost'",
    ),
    ("train-bad-name", ["train", "Bad_Name", "train.py", "-w", "{tmp}/work"], 2, "invalid"),
    ("train-no-script", ["train", "ghost", "-w", "{tmp}/work"], 2, "name the script"),
    ("train-missing-script", ["train", "ghost", "nope.py", "-w", "{tmp}/work"], 2, "not found"),
    ("train-script-outside", ["train", "ghost", "../x.py", "-w", "{tmp}/work"], 2, "inside"),
    (
        "train-bad-env",
        ["train", "ghost", "train.py", "-w", "{tmp}/work", "--env", "1A=2"],
        2,
        "--env: '1A=2'",
    ),
    ("train-missing-spec", ["train", "ghost", "-f", "{tmp}/nope.yaml"], 2, "not found"),
    ("logs-unknown", ["logs", "ghost"], 1, "'ghost'"),
    ("logs-unknown-job", ["logs", "ghost", "--job", "3"], 1, "no cluster named 'ghost'"),
    ("exec-unknown", ["exec", "ghost", "--", "true"], 1, "no cluster named 'ghost'"),
    ("exec-bad-name", ["exec", "Bad_Name", "--", "true"], 2, "invalid cluster name"),
    ("status-unknown", ["status", "ghost"], 1, "no cluster named 'ghost'"),
    ("init-unknown-template", ["init", "{tmp}/proj", "--template", "nope"], 2, "'nope'"),
    ("init-template-path", ["init", "{tmp}/proj", "--template", "../ddp"], 2, "unknown"),
    ("init-under-a-file", ["init", "{tmp}/work/train.py/proj"], 1, "cannot write the project"),
]


@pytest.mark.parametrize("args, code, words", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_is_one_line_and_creates_nothing(cli, tmp_path, home, workdir, args, code, words):
    assert_one_error_line(cli(*args), code, words)
    assert cluster_names(home) == []
    assert not (tmp_path / "proj").exists()


# Spec files given to `up NAME -f FILE`: (id, text, field and line named in the message).
BAD_SPECS = [
    ("unknown-top", "name: ok\nfoo: 1\n", ":2: foo: unknown field"),
    ("unknown-nested", "resources:\n  gpu: A100\n", ":2: resources.gpu: unknown field"),
    ("nodes-text", "nodes: two\n", ":1: nodes: must be a whole number"),
    ("nodes-zero", "nodes: 0\n", ":1: nodes:"),
    ("nodes-bool", "nodes: true\n", ":1: nodes:"),
    ("spot-text", 'spot: "yes"\n', ":1: spot: must be true or false"),
    ("envs-list", "envs:\n  - A=1\n", ":1: envs: must be a mapping"),
    ("env-value-mapping", "envs:\n  A: {b: 1}\n", ":2: envs.A: must be a single value"),
    ("env-bad-name", "envs:\n  1A: x\n", ":2: envs.1A: not a valid variable name"),
    ("args-mapping", "train:\n  args: {a: 1}\n", ":2: train.args: must be a list"),
    ("resources-list", "resources: [a]\n", ":1: resources: must be a mapping"),
    ("max-cost-negative", "autoscale:\n  max_cost: -1\n", ":2: autoscale.max_cost:"),
    ("gpus-zero", "resources:\n  gpus: 'A100:0'\n", ":2: resources.gpus: 'A100:0'"),
    ("gpus-x", "resources:\n  gpus: 'A100:x'\n", ":2: resources.gpus: 'A100:x'"),
    ("gpus-no-model", "resources:\n  gpus: ':8'\n", ":2: resources.gpus: ':8'"),
    ("gpus-no-count", "resources:\n  gpus: 'A100:'\n", ":2: resources.gpus: 'A100:'"),
    ("gpus-number", "resources:\n  gpus: 8\n", ":2: resources.gpus: '8'"),
    ("duplicate", "nodes: 1\nnodes: 2\n", ":2: nodes: duplicate key"),
    ("invalid-yaml", "name: ok\nnodes: [1\n", ":3: not valid YAML"),
    ("top-level-list", "- name\n", ": the top level must be a mapping"),
    ("bad-name", "name: Bad_Name\n", ":1: name: invalid cluster name"),
    ("not-utf8", b"name: \xff\n", ": not UTF-8"),
]


@pytest.mark.parametrize("text, where", [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_up_refuses_bad_spec(cli, tmp_path, home, text, where):
    spec = tmp_path / "bad.yaml"
    spec.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = cli("up", "ok", "-f", str(spec))
    line = assert_one_error_line(r, 2, f"{spec}")
    assert line.startswith(f"error: {spec}{where}"), line
    assert cluster_names(home) == []


def test_failed_commands_leave_status_empty(cli_process, tmp_path, workdir):
    """A run of failing commands in one MLCLOUD_HOME, then the real `status --json`: all through
    the real console script."""
    cli = cli_process
    (tmp_path / "bad.yaml").write_text("nodes: 2\nresources:\n  gpus: 'A100:0'\n")
    for args in (
        ["up", "Bad_Name"],
        ["up", "ok", "--nodes", "0"],
        ["up", "ok", "-f", "{tmp}/bad.yaml"],
        ["up", "ok", "--provider", "nope"],
        ["train", "ok", "train.py", "-w", "{tmp}/work"],
        ["down", "ok"],
    ):
        assert cli(*args).returncode != 0
    assert clusters(cli) == EMPTY


def test_empty_spec_is_fine_but_name_still_checked(cli, tmp_path, home):
    spec = tmp_path / "empty.yaml"
    spec.write_text("")
    assert_one_error_line(cli("up", "Bad_Name", "-f", str(spec)), 2, "invalid cluster name")
    assert_one_error_line(cli("up", "-f", str(spec)), 2, "name the cluster")
    assert cluster_names(home) == []


# click's own usage errors: one line naming the bad option or argument, exit 2, no usage block.
CLICK_ERRORS = [
    ("unknown-command", ["frobnicate"], "no such command 'frobnicate'"),
    ("unknown-option", ["up", "ok", "--bogus"], "no such option: --bogus"),
    ("nodes-not-a-number", ["up", "ok", "--nodes", "abc"], "--nodes: 'abc' is not a valid"),
    ("train-no-name", ["train"], "missing argument"),
    ("exec-no-command", ["exec", "ghost"], "missing argument"),
    ("nproc-zero", ["train", "ghost", "train.py", "--nproc-per-node", "0"], "--nproc-per-node: 0"),
    ("spec-is-a-dir", ["up", "ok", "-f", "{tmp}"], "--file:"),
    ("init-into-a-file", ["init", "{tmp}/work/train.py"], "DIRECTORY: Directory"),
    ("logs-job-not-int", ["logs", "ghost", "--job", "x"], "--job: 'x'"),
    ("max-price-not-a-number", ["offers", "A100:8", "--max-price", "x"], "--max-price: 'x'"),
    # nan and inf pass click's min= bounds: each float option refuses them itself.
    ("grace-nan", ["cancel", "ghost", "--grace", "nan"], "--grace: nan is not a finite"),
    ("grace-inf", ["cancel", "ghost", "--grace", "inf"], "--grace: inf is not a finite"),
    ("min-age-nan", ["gc", "--min-age", "nan"], "--min-age: nan is not a finite"),
    ("doctor-timeout-inf", ["doctor", "--timeout", "inf"], "--timeout: inf is not a finite"),
    ("max-hours-nan", ["up", "ok", "--max-hours", "nan"], "--max-hours: nan is not a finite"),
]


@pytest.mark.parametrize(
    "args, words", [e[1:] for e in CLICK_ERRORS], ids=[e[0] for e in CLICK_ERRORS]
)
def test_click_usage_errors_are_one_line(cli, home, workdir, args, words):
    line = assert_one_error_line(cli(*args), 2, words)
    assert "Usage:" not in line and "--help`)" in line, line
    assert cluster_names(home) == []


# Refused by mlcloud itself, after click parsed them.
MORE_USAGE_ERRORS = [
    ("max-price-negative", ["offers", "A100:8", "--max-price", "-1"], "--max-price: -1"),
    ("max-price-nan", ["offers", "A100:8", "--max-price", "nan"], "--max-price: nan"),
    ("max-price-inf", ["offers", "A100:8", "--max-price", "inf"], "--max-price: inf"),
    ("max-price-zero", ["offers", "A100:8", "--max-price", "0"], "--max-price: 0"),
    ("offers-unknown-provider", ["offers", "A100:8", "-p", "nosuch"], "unknown provider 'nosuch'"),
]


@pytest.mark.parametrize(
    "args, words", [e[1:] for e in MORE_USAGE_ERRORS], ids=[e[0] for e in MORE_USAGE_ERRORS]
)
def test_offers_refuses_bad_filters(cli, args, words):
    assert_one_error_line(cli(*args), 2, words)


def test_offers_with_a_good_max_price_still_answers(cli):
    r = cli("offers", "A100:8", "--max-price", "100", "--json")
    assert r.returncode == 0, r.stderr
    assert all(o["usd_per_hour"] <= 100 for o in json.loads(r.stdout)["offers"])


# --json on a failing command: the error object on stdout as well as the line on stderr.
JSON_ERRORS = [
    ("status-unknown", ["status", "ghost", "--json"], "not_found", 1),
    ("status-bad-name", ["status", "Bad_Name", "--json"], "usage", 2),
    ("status-bad-option", ["status", "--json", "--bogus"], "usage", 2),
    ("up-bad-nodes", ["up", "ok", "--nodes", "x", "--json"], "usage", 2),
    ("up-no-name", ["up", "--json"], "usage", 2),
    ("gpus-unknown", ["gpus", "nosuch", "--json"], "usage", 2),
    ("offers-negative", ["offers", "A100:8", "--max-price", "-1", "--json"], "usage", 2),
    ("cost-in-a-file-home", ["cost", "--json"], "failed", 1),
]


@pytest.mark.parametrize(
    "args, kind, code", [e[1:] for e in JSON_ERRORS], ids=[e[0] for e in JSON_ERRORS]
)
def test_json_error_object_on_stdout(cli, home, args, kind, code):
    if "cost" in args:
        home.write_text("not a directory\n")
    r = cli(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    error = json.loads(r.stdout)["error"]
    assert error == {"kind": kind, "message": lines[0][len("error: ") :], "exit_code": code}


def test_json_after_double_dash_is_not_ours(cli):
    """`exec c -- cmd --json`: the --json is the remote command's, so stdout stays empty."""
    r = cli("exec", "ghost", "--", "cat", "--json")
    assert_one_error_line(r, 1, "ghost")


def test_down_without_terminal_refuses_even_with_piped_yes(cli, home, monkeypatch):
    """A pipe is not a terminal: `yes | mlcloud down x` must not count as consent."""
    from mlcloud import state

    monkeypatch.setenv("MLCLOUD_HOME", str(home))
    state.open_store().create_cluster("ok", "ok-1", "local", {}, "me")  # a row: no nodes
    assert_one_error_line(cli("down", "ok", input="y\n"), 2, "--yes")
    assert cluster_names(home) == ["ok"]


def test_down_without_terminal_keeps_a_real_cluster(cli_process):
    cli = cli_process
    r = cli("up", "keep", "--nodes", "1", "--json")
    assert r.returncode == 0, r.stderr
    try:
        assert_one_error_line(cli("down", "keep"), 2, "rerun with --yes")
        assert [c["name"] for c in clusters(cli)["clusters"]] == ["keep"]
        # a bad spec or bad --nodes on an existing name changes nothing either
        assert_one_error_line(cli("up", "keep", "--nodes", "0"), 2, "--nodes")
        assert [c["name"] for c in clusters(cli)["clusters"]] == ["keep"]
    finally:
        r = cli("down", "keep", "--yes")
    assert r.returncode == 0, r.stderr
    assert clusters(cli) == EMPTY


@pytest.mark.parametrize("existing", ["train.py", "mlcloud.yaml"])
def test_init_refuses_to_overwrite_and_writes_nothing(cli, tmp_path, existing):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / existing).write_text("mine\n")
    line = assert_one_error_line(cli("init", str(proj)), 2, "already exists")
    assert existing in line and "nothing written" in line
    assert [p.name for p in proj.iterdir()] == [existing]
    assert (proj / existing).read_text() == "mine\n"


def test_init_then_up_with_its_spec_parses(cli, tmp_path):
    """The scaffolded spec is valid: `up` with a bad name still fails on the name, not the file."""
    proj = tmp_path / "proj"
    r = cli("init", str(proj))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in proj.iterdir()} == {"train.py", "mlcloud.yaml"}
    line = assert_one_error_line(cli("up", "Bad_Name", "-f", str(proj / "mlcloud.yaml")), 2, "")
    assert "invalid cluster name 'Bad_Name'" in line


# --- help, version, debug, empty status --------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[], ["up"], ["down"], ["status"], ["train"], ["logs"], ["exec"], ["init"], ["doctor"]],
)
def test_help_exits_zero(cli, command):
    r = cli(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: mlcloud") and r.stderr == ""


def test_no_arguments_shows_help(cli):
    r = cli()
    assert "Usage: mlcloud" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_version(cli):
    r = cli("--version")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == f"mlcloud {mlcloud.__version__}\n"


@pytest.mark.parametrize(
    "args", [["up", "Bad_Name"], ["up", "ok", "-f", "{tmp}/bad.yaml"], ["status", "ghost"]]
)
def test_debug_shows_traceback(cli, tmp_path, home, args):
    (tmp_path / "bad.yaml").write_text("nodes: 0\n")
    r = cli("--debug", *args)
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "mlcloud.errors." in r.stderr
    assert cluster_names(home) == []


def test_status_json_with_no_clusters(cli, home):
    r = cli("status", "--json")
    assert r.returncode == 0 and r.stderr == ""
    assert json.loads(r.stdout) == EMPTY
    r = cli("status")
    assert r.returncode == 0 and "no clusters" in r.stdout


def test_debug_after_double_dash_belongs_to_the_command(cli):
    assert_one_error_line(cli("exec", "ghost", "--", "echo", "--debug"), 1, "ghost")


@pytest.mark.parametrize("command", ["status", "logs"])
def test_invalid_name_is_a_usage_error_everywhere(cli, command):
    assert_one_error_line(cli(command, "Bad_Name"), 2, "invalid cluster name")


@pytest.mark.parametrize("hosts", ["a@@h", "h:99999", "h:port", "a b"])
def test_bad_hosts_refused(cli, hosts):
    assert_one_error_line(cli("up", "lab", "--hosts", hosts), 2, "--hosts")
