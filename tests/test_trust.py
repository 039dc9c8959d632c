"""A spec file's ssh.proxy_command runs on this machine only once a person has confirmed it
for that file (remembered in the home), or with --allow-proxy-command; a --proxy-command flag
is the user's own."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from conftest import on_a_terminal, run_cli

from mlcloud.errors import Aborted, UsageError
from mlcloud.provision import trust

RELAY = Path(__file__).parent / "tcp_relay.py"


def never(question: str) -> bool:
    raise AssertionError("asked, though it should not have been")


def test_from_a_spec_file_it_is_asked_once_per_file_and_command(tmp_path, mlcloud_home):
    spec, other = tmp_path / "a.yaml", tmp_path / "b.yaml"
    questions: list[str] = []

    def yes(question: str) -> bool:
        questions.append(question)
        return True

    trust.check_proxy_command(spec, "ssh -W %h:%p bastion", False, yes)
    assert len(questions) == 1 and "ssh -W %h:%p bastion" in questions[0]
    assert str(spec) in questions[0]
    trust.check_proxy_command(spec, "ssh -W %h:%p bastion", False, None)  # remembered
    trust.check_proxy_command(tmp_path / "." / "a.yaml", "ssh -W %h:%p bastion", False, never)
    with pytest.raises(UsageError, match="--allow-proxy-command"):  # another command
        trust.check_proxy_command(spec, "ssh -W %h:%p evil", False, None)
    with pytest.raises(UsageError, match="--allow-proxy-command"):  # another file
        trust.check_proxy_command(other, "ssh -W %h:%p bastion", False, None)
    saved = mlcloud_home / "trusted.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text()) == {
        "proxy_command": [{"spec": str(spec.resolve()), "command": "ssh -W %h:%p bastion"}]
    }


def test_a_refusal_or_the_flag_is_not_remembered(tmp_path, mlcloud_home):
    spec = tmp_path / "a.yaml"
    with pytest.raises(Aborted):
        trust.check_proxy_command(spec, "nc %h %p", False, lambda q: False)
    trust.check_proxy_command(spec, "nc %h %p", True, never)  # --allow-proxy-command
    assert not trust.trusted(spec, "nc %h %p")
    with pytest.raises(UsageError) as e:
        trust.check_proxy_command(spec, "nc %h %p", False, None)
    assert "\n" not in str(e.value) and "'nc %h %p'" in str(e.value)


def test_a_damaged_record_trusts_nothing_and_is_repaired(tmp_path, mlcloud_home):
    spec = tmp_path / "a.yaml"
    mlcloud_home.mkdir(parents=True, exist_ok=True)
    (mlcloud_home / "trusted.json").write_text('{"proxy_command": [{"spec": ')
    assert not trust.trusted(spec, "nc %h %p")
    trust.check_proxy_command(spec, "nc %h %p", False, lambda q: True)
    assert trust.trusted(spec, "nc %h %p")


# --- through the real CLI, with a real sshd node behind the proxy command ------------------


def proxy_spec(tmp_path, nodes, marker: Path) -> Path:
    """A spec, as a cloned repository might hold, whose proxy command leaves a marker."""
    n = nodes.nodes[0]
    proxy = f"sh -c 'touch {marker}; exec {sys.executable} {RELAY} {n.host} %p'"
    spec = tmp_path / "repo" / "mlcloud.yaml"
    spec.parent.mkdir()
    spec.write_text(
        "provider: ssh\n"
        f"hosts: ['{n.user}@10.0.0.99:{n.port}']\n"
        f'ssh:\n  identity_file: {nodes.client_key}\n  proxy_command: "{proxy}"\n'
    )
    return spec


def test_cli_asks_refuses_without_a_terminal_and_remembers(make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(1)
    marker = tmp_path / "proxy-ran"
    spec = proxy_spec(tmp_path, nodes, marker)

    # CI (no terminal): one line naming the command and the flag; nothing ran or was made
    r = run_cli("up", "p", "-f", str(spec), "--yes")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ssh.proxy_command would run" in lines[0]
    assert "--allow-proxy-command" in lines[0] and str(spec) in lines[0]
    assert not marker.exists()
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []

    # a person says no: still nothing
    r = on_a_terminal(["up", "p", "-f", str(spec), "--yes"], "n")
    assert r.returncode == 1 and r.stderr.endswith("aborted\n") and not marker.exists()

    # a person says yes: it runs, and the answer is kept for this file and command
    r = on_a_terminal(["up", "p", "-f", str(spec), "--yes"], "y")
    assert r.returncode == 0, r.stderr
    assert "runs on this machine" in r.stderr and marker.exists()
    assert run_cli("down", "p", "--yes").returncode == 0
    marker.unlink()
    r = run_cli("up", "p", "-f", str(spec), "--yes")
    assert r.returncode == 0, r.stderr
    assert marker.exists()
    assert run_cli("down", "p", "--yes").returncode == 0


def test_cli_flags_allow_it_for_one_run(make_ssh_nodes, tmp_path):
    nodes = make_ssh_nodes(1)
    marker = tmp_path / "proxy-ran"
    spec = proxy_spec(tmp_path, nodes, marker)
    r = run_cli("up", "p", "-f", str(spec), "--yes", "--allow-proxy-command")
    assert r.returncode == 0, r.stderr
    assert marker.exists()
    assert run_cli("down", "p", "--yes").returncode == 0
    r = run_cli("up", "p", "-f", str(spec), "--yes")  # not remembered
    assert r.returncode == 2 and "--allow-proxy-command" in r.stderr

    # the user's own --proxy-command replaces the spec's and is trusted as it is
    marker.unlink()
    n = nodes.nodes[0]
    own = f"sh -c 'touch {marker}; exec {sys.executable} {RELAY} {n.host} %p'"
    r = run_cli("up", "p", "-f", str(spec), "--yes", "--proxy-command", own)
    assert r.returncode == 0, r.stderr
    assert marker.exists()
    assert run_cli("down", "p", "--yes").returncode == 0
