"""Trust for commands a spec file would run on this machine.

`ssh.proxy_command` is run locally to reach the nodes, so a spec file in a cloned repository
could run anything on the user's machine. Such a command runs only once a person has seen it
and confirmed it for that spec file; the answer is kept in the home (trusted.json), per
(spec file, command), so a changed command or another file asks again. A command given on
the command line is the user's own and needs no confirmation. On a shared store the answers
are the team's: kept there for every home (mlcloud/state/files.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mlcloud.errors import Aborted, MlcloudError, UsageError
from mlcloud.state import paths

FILE = "trusted.json"


def _load() -> list[dict]:
    """What was confirmed; an unreadable or damaged file trusts nothing."""
    from mlcloud.state import files

    try:
        data = json.loads(files.read(FILE) or b"{}")
        entries = data["proxy_command"]
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def trusted(spec_file: Path, command: str) -> bool:
    entry = {"spec": str(spec_file.resolve()), "command": command}
    return entry in _load()


def remember(spec_file: Path, command: str) -> None:
    """Record a confirmation: a temporary file, fsynced, renamed over the old one (0600)."""
    entry = {"spec": str(spec_file.resolve()), "command": command}
    from mlcloud.state import files

    target = paths.home() / FILE
    try:
        with files.exclusive(f"{FILE}.lock"):
            entries = [e for e in _load() if e != entry] + [entry]
            files.write(FILE, json.dumps({"proxy_command": entries}, indent=1).encode())
    except OSError as e:
        raise MlcloudError(
            f"cannot record the confirmation in {target}: {e.strerror}; "
            "pass --allow-proxy-command instead"
        ) from None


def check_proxy_command(
    spec_file: Path, command: str, allowed: bool, ask: Callable[[str], bool] | None
) -> None:
    """Let a spec file's proxy command run, or refuse in one line.

    allowed: the user passed --allow-proxy-command (trusted for this run, not remembered).
    ask: shows the command and returns the person's answer; None when nobody can be asked."""
    if allowed or trusted(spec_file, command):
        return
    if ask is None:
        raise UsageError(
            f"{spec_file}: ssh.proxy_command would run {command!r} on this machine; if you "
            "trust it, confirm it once on a terminal or pass --allow-proxy-command"
        )
    if not ask(
        f"{spec_file} sets ssh.proxy_command, a command that runs on this machine:\n"
        f"  {command}\nRun it to reach the nodes? (asked once for this file and command)"
    ):
        raise Aborted()
    remember(spec_file, command)
