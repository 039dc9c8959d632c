"""One way to quote for a node's shell: mlcloud/remote/shell.py. A shell line built elsewhere
with shlex directly is a second way, whose next edit may forget a value (or a ~/ path)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELL = ROOT / "mlcloud" / "remote" / "shell.py"
QUOTING = {"quote", "join"}


def _quoting(path: Path) -> list[str]:
    """`shlex.quote`/`shlex.join` used (or imported from shlex) in a file, as file:line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in QUOTING
            and isinstance(node.value, ast.Name)
            and node.value.id == "shlex"
        ) or (
            isinstance(node, ast.ImportFrom)
            and node.module == "shlex"
            and any(a.name in QUOTING for a in node.names)
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_remote_shell_lines_quote_only_through_shell_py():
    files = [p for folder in ("mlcloud", "providers") for p in (ROOT / folder).rglob("*.py")]
    assert SHELL in files and _quoting(SHELL)  # the scan sees the one place that may
    stray = [hit for p in files if p != SHELL for hit in _quoting(p)]
    assert stray == [], f"quote through mlcloud.remote.shell instead: {stray}"
