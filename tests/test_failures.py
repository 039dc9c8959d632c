"""How a command ends, for every kind of failure: one line on stderr, the documented exit code
(the same on every command), an error object on stdout with --json, a traceback only with
--debug (and, for a bug, in a file under $MLCLOUD_HOME/logs/), library loggers quiet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MLCLOUD, run_cli, run_cli_in_process

# The real main() in a fresh interpreter, with one engine function made to raise: the way
# each kind of failure reaches the top, whatever the command.
PROBE = """
import json, sys
argv, target, raise_ = json.loads(sys.argv[1])
module, attr = target.rsplit(".", 1)
import importlib
mod = importlib.import_module(module)

def boom(*a, **k):
    import logging
    logging.getLogger("paramiko.transport").error("paramiko says: Traceback (noise)")
    exec(raise_)

setattr(mod, attr, boom)
sys.argv = ["mlcloud", *argv]
from mlcloud.cli.app import main
main()
"""

RAISE = {
    "usage": ("from mlcloud.errors import UsageError; raise UsageError('bad input')", 2),
    "not_found": ("from mlcloud.errors import NotFoundError; raise NotFoundError('gone')", 1),
    "capacity": (
        "from mlcloud.providers.base import CapacityError; raise CapacityError('z', 'no room')",
        3,
    ),
    "quota": ("from mlcloud.providers.base import QuotaError; raise QuotaError('r', 'quota')", 4),
    "auth": ("from mlcloud.providers.base import AuthError; raise AuthError('no creds')", 5),
    "interrupted": ("raise KeyboardInterrupt", 130),
    "cloud": (
        "from botocore.exceptions import ClientError; raise ClientError({'Error': {'Code': "
        "'InternalError', 'Message': 'it broke'}}, 'RunInstances')",
        1,
    ),
    "environment": ("raise PermissionError(13, 'Permission denied', '/some/where')", 1),
    "internal": ("raise ZeroDivisionError('division by zero')", 1),
}

# Every command that reads state, each stopped where it first opens the store.
COMMANDS = [
    ["status"],
    ["status", "c1"],
    ["events", "c1"],
    ["up", "c1", "--yes"],
    ["down", "c1", "--yes"],
    ["train", "c1", "train.py", "-w", "{tmp}"],
    ["logs", "c1"],
    ["exec", "c1", "--", "true"],
    ["cancel", "c1"],
    ["ssh", "c1"],
    ["cost"],
    ["gc", "--provider", "local"],
]


def probe(args: list[str], raise_: str, tmp: Path, *extra: str, env: dict | None = None):
    (tmp / "train.py").write_text("print('hi')\n")
    argv = [*extra, *(a.replace("{tmp}", str(tmp)) for a in args)]
    return subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([argv, "mlcloud.state.open_store", raise_])],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def probe_here(args: list[str], raise_: str, tmp: Path, monkeypatch):
    """As probe, in this process (conftest.run_cli_in_process): the exit code and the one line
    are the subject, not the process."""
    import logging

    from mlcloud import state

    (tmp / "train.py").write_text("print('hi')\n")

    def boom(*a, **k):
        logging.getLogger("paramiko.transport").error("paramiko says: Traceback (noise)")
        exec(raise_)

    monkeypatch.setattr(state, "open_store", boom)
    return run_cli_in_process(*(a.replace("{tmp}", str(tmp)) for a in args), cwd=tmp)


def one_line(r) -> str:
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    assert "paramiko says" not in r.stderr  # library loggers are quiet
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["usage", "capacity", "quota", "auth", "interrupted"])
@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_exit_codes_are_the_same_on_every_command(tmp_path, args, kind, monkeypatch):
    raise_, code = RAISE[kind]
    r = probe_here(args, raise_, tmp_path, monkeypatch)
    assert r.returncode == code, (r.returncode, r.stderr)
    one_line(r)


@pytest.mark.parametrize("kind", list(RAISE))
def test_json_error_object_for_every_kind(tmp_path, kind, monkeypatch):
    raise_, code = RAISE[kind]
    r = probe_here(["status", "--json"], raise_, tmp_path, monkeypatch)
    line = one_line(r)
    assert r.returncode == code
    assert json.loads(r.stdout) == {
        "error": {"kind": kind, "message": line.removeprefix("error: "), "exit_code": code}
    }


def test_cloud_sdk_error_names_provider_and_operation(tmp_path):
    r = probe(["status"], RAISE["cloud"][0], tmp_path)
    line = one_line(r)
    assert line == ("error: aws: RunInstances failed: InternalError it broke (--debug for details)")


def test_environment_error_names_the_path(tmp_path):
    line = one_line(probe(["cost"], RAISE["environment"][0], tmp_path))
    assert line.startswith("error: /some/where: permission denied; check its permissions")


def test_bug_writes_its_traceback_to_a_file(tmp_path, mlcloud_home):
    r = probe(["status"], RAISE["internal"][0], tmp_path)
    line = one_line(r)
    assert r.returncode == 1
    assert "internal error (ZeroDivisionError: division by zero)" in line
    path = Path(line.rsplit(" ", 1)[1])
    assert path.parent == mlcloud_home / "logs" and path.name.startswith("crash-")
    assert path.suffix == ".txt" and path.stat().st_mode & 0o077 == 0
    text = path.read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "boom" in text


def test_bug_with_an_unusable_home_writes_to_a_temp_dir(tmp_path, monkeypatch):
    home = tmp_path / "home-file"
    home.write_text("")
    monkeypatch.setenv("MLCLOUD_HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    line = one_line(probe(["status"], RAISE["internal"][0], tmp_path))
    path = Path(line.rsplit(" ", 1)[1])
    assert path.parent == tmp_path and "ZeroDivisionError" in path.read_text()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_traceback_and_library_logs(tmp_path, how):
    extra, env = (["--debug"], None) if how == "flag" else ([], {"MLCLOUD_DEBUG": "1"})
    r = probe(["status"], RAISE["cloud"][0], tmp_path, *extra, env=env)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ClientError" in r.stderr
    assert "paramiko says" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: aws: RunInstances failed")


def running_under(root: int, cmdline: bytes) -> bool:
    """Whether a descendant of root runs with this command line (NUL-separated argv)."""
    children: dict[int, list[int]] = {}
    cmds: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmds[int(entry)] = f.read()
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        if cmds.get(pid, b"").rstrip(b"\0") == cmdline:
            return True
        stack.extend(children.get(pid, ()))
    return False


def test_sigterm_during_a_command_is_interrupted(tmp_path):
    """A real signal: `exec` on a local cluster running `sleep`, stopped with SIGTERM."""
    assert run_cli("up", "sig", "--nodes", "1", "--yes").returncode == 0
    try:
        proc = subprocess.Popen(
            [MLCLOUD, "exec", "sig", "--", "sleep 30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + 30  # the command runs on the node
        while not running_under(proc.pid, b"sleep\x0030"):
            assert time.monotonic() < deadline, "exec never started sleep 30"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.splitlines()[-1] == "error: interrupted"
    finally:
        assert run_cli("down", "sig", "--yes").returncode == 0
