"""The CLI's fast paths must not import the heavy SDKs (boto3, google-cloud, paramiko, torch).

Each case runs the CLI's main() in a fresh interpreter and lists what it left in sys.modules;
the SDKs belong only to the commands that reach a cloud or a node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = {"boto3", "botocore", "google", "paramiko", "torch"}

PROBE = (
    "import json, sys\n"
    "heavy = set(json.loads(sys.argv[2]))\n"
    "sys.argv = ['mlcloud', *json.loads(sys.argv[1])]\n"
    "from mlcloud.cli.app import main\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    "sys.stdout.flush()\n"
    "print('MODULES=' + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
)

COMMANDS = [
    "up",
    "down",
    "status",
    "events",
    "train",
    "logs",
    "exec",
    "cancel",
    "pull",
    "init",
    "ssh",
    "gc",
    "gpus",
    "offers",
    "cost",
    "catalog",
]

CASES = [
    ["--help"],
    ["--version"],
    ["status"],
    ["status", "--json"],
    ["gpus"],
    ["offers", "A100:8"],
    ["cost"],
    *([command, "--help"] for command in COMMANDS),
]


@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_no_heavy_imports(args, tmp_path, monkeypatch):
    monkeypatch.setenv("MLCLOUD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("MLCLOUD_DEBUG", raising=False)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args), json.dumps(sorted(HEAVY))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MODULES=")]
    assert lines, f"probe did not finish (rc {proc.returncode}):\n{proc.stderr}"
    modules = json.loads(lines[-1].removeprefix("MODULES="))
    assert modules == [], f"`mlcloud {' '.join(args)}` imported heavy modules: {modules}"
