"""An empty list is an error, never a default: `up lab --hosts "$HOSTS"` with HOSTS unset in
CI must not make a local cluster and train on the runner. The same for every list or value
a flag, a spec key or an environment variable gives: one `error:` line, exit 2, nothing
made."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import MLCLOUD, run_cli, run_cli_in_process

FLAGS = [
    (["up", "lab", "--hosts", ""], "--hosts: empty"),
    (["up", "lab", "--hosts", ","], "--hosts: an empty list"),
    (["up", "lab", "--hosts", " , "], "--hosts: an empty list"),
    (["up", "lab", "--hosts", "a@h1,,b@h2"], "--hosts: 'a@h1,,b@h2' has an empty item"),
    (["up", "lab", "--hosts", "a@h1,"], "has an empty item"),
    (["up", "lab", "--provider", ""], "--provider: empty"),
    (["up", "lab", "--region", " "], "--region: empty"),
    (["up", "lab", "--zone", ""], "--zone: empty"),
    (["up", "lab", "--gpus", ""], "--gpus: empty"),
    (["up", "lab", "--image", ""], "--image: empty"),
    (["up", "lab", "--instance-type", ""], "--instance-type: empty"),
    (["up", "lab", "--project", ""], "--project: empty"),
    (["up", "lab", "--near", ""], "--near: empty"),
    (["up", "lab", "--ssh-user", ""], "--ssh-user: empty"),
    (["up", "lab", "--proxy-command", ""], "--proxy-command: empty"),
    (["up", "lab", "--allow-ssh-from", "10.0.0.1", "--allow-ssh-from", ""], "empty"),
    (["gc", "--region", "", "--dry-run"], "--region: empty"),
    (["gc", "--owner", "", "--dry-run"], "--owner: empty"),
    (["gc", "--provider", "", "--dry-run"], "--provider: empty"),
    (["doctor", "--provider", ""], "--provider: empty"),
    (["doctor", "--rebuild", "--region", ""], "--region: empty"),
    (["train", "lab", ""], "SCRIPT: empty"),
    (["train", "lab", "--env", "", "t.py"], "--env: ''"),
    (["exec", "lab", ""], "COMMAND: empty"),
    (["down", "", "--yes"], "invalid cluster name ''"),
]


def one_line(r, words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert words in lines[0] and "Traceback" not in r.stderr, lines[0]


@pytest.mark.parametrize("args, words", FLAGS, ids=[" ".join(a)[:50] for a, _ in FLAGS])
def test_an_empty_flag_value_is_refused_not_defaulted(mlcloud_home, args, words):
    one_line(run_cli_in_process(*args), words)
    assert not (mlcloud_home / "local").exists()  # no cluster made


SPEC = [
    ("hosts: []\n", "hosts: an empty list"),
    ("provider: ssh\nhosts: []\n", "hosts: an empty list"),
    ("storage:\n  data: []\n", "storage.data: an empty list"),
    ("ssh:\n  allowed_cidrs: []\n", "ssh.allowed_cidrs: an empty list"),
]


@pytest.mark.parametrize("text, words", SPEC, ids=[s[1].split(":")[0] for s in SPEC])
def test_an_empty_list_in_the_spec_is_refused(mlcloud_home, tmp_path, text, words):
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text(text)
    one_line(run_cli_in_process("up", "lab", "-f", str(spec), "--yes"), words)
    assert not (mlcloud_home / "local").exists()


def test_an_unset_hosts_variable_in_ci_makes_no_cluster(mlcloud_home, monkeypatch):
    """The real process, as a CI step runs it: `mlcloud up lab --hosts "$HOSTS" --yes`."""
    monkeypatch.setenv("HOSTS", "")
    r = subprocess.run(
        ["sh", "-c", f'"{MLCLOUD}" up lab --hosts "$HOSTS" --yes'],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
    )
    assert r.returncode == 2 and "--hosts: empty" in r.stderr, r.stderr
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
