"""The `e2e` marker means something: `make test` runs everything, `make test-fast` (-m "not e2e")
leaves out every test that starts sshd nodes, a moto server, torchrun or pip."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Modules whose every test starts real daemons or training.
SLOW_MODULES = {
    "test_aws_cli.py",
    "test_e2e_local.py",
    "test_e2e_ssh.py",
    "test_template_ddp.py",
    "test_sshnodes.py",
    "test_packaging.py",
    "test_ssh_liveness.py",
    "test_recovery_e2e.py",
    "test_stall_e2e.py",
}


def collected(*args: str) -> set[str]:
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return {line for line in r.stdout.splitlines() if "::" in line}


def test_fast_selection_leaves_out_every_real_process_test():
    fast = collected("-m", "not e2e", "tests")  # one collection: each costs seconds
    assert "tests/test_markers.py::test_fast_selection_leaves_out_every_real_process_test" in fast
    for test in fast:
        assert test.split("::")[0].rsplit("/", 1)[-1] not in SLOW_MODULES, test
    # a test that asks for sshd nodes or a moto server is e2e wherever it lives
    uses = re.compile(r"def (test_\w+)\([^)]*\b(make_ssh_nodes|moto_server)\b", re.S)
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name, _ in uses.findall(path.read_text()):
            assert not any(t.startswith(f"tests/{path.name}::{name}") for t in fast), name
