"""Every command with a damaged MLCLOUD_HOME (a file, a read-only mount, a corrupt state.db, a
full disk on a small tmpfs): one `error:` line naming what is wrong, a non-zero exit, no
traceback. `mlcloud doctor` then says the same. The subject is each command's message and
exit code, so the walk runs the console script's own function in-process (run_cli_in_process);
its first command goes through the real `mlcloud` process, so both ends are seen."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli_in_process

MLCLOUD = str(Path(sys.executable).parent / "mlcloud")

# Commands that need the state database: with the home damaged, each must fail in one line.
STATEFUL = [
    ["status"],
    ["status", "--json"],
    ["status", "c1"],
    ["events", "c1"],
    ["up", "c2", "--yes"],
    ["up", "c1", "--yes"],
    ["down", "c1", "--yes"],
    ["down", "--all", "--yes"],
    ["train", "c1", "train.py", "-w", "{work}"],
    ["train", "c1", "train.py", "-w", "{work}", "--detach"],
    ["logs", "c1"],
    ["logs", "c1", "--follow"],
    ["exec", "c1", "--", "true"],
    ["cancel", "c1"],
    ["ssh", "c1"],
    ["cost"],
    ["cost", "--json"],
    ["gc", "--provider", "local"],
    ["doctor"],
    ["doctor", "--json"],
]
# Commands that may work without a usable home; if they fail, it is in one line too.
STATELESS = [
    ["gpus"],
    ["offers", "A100:8"],
    ["init", "{tmp}/proj"],
    ["catalog", "show"],
    ["--help"],
    ["--version"],
]


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "MLCLOUD_HOME": str(home), "NO_COLOR": "1"}
    env.pop("MLCLOUD_DEBUG", None)
    return env


def _argv(args: list[str], tmp: Path) -> list[str]:
    return [a.replace("{work}", str(tmp / "work")).replace("{tmp}", str(tmp)) for a in args]


def mlcloud(args: list[str], home: Path, tmp: Path) -> subprocess.CompletedProcess:
    """The real console script."""
    return subprocess.run(
        [MLCLOUD, *_argv(args, tmp)],
        env=_env(home),
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )


def in_process(args: list[str], home: Path, tmp: Path) -> subprocess.CompletedProcess:
    """The same command through the console script's function, in this process."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_env(home))
    try:
        return run_cli_in_process(*_argv(args, tmp), cwd=tmp)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def one_line_or_ok(r: subprocess.CompletedProcess, args: list[str]) -> str | None:
    assert "Traceback" not in r.stdout + r.stderr, (args, r.stderr)
    if r.returncode == 0:
        return None
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
    if "--json" in args and args[0] != "doctor":
        assert json.loads(r.stdout)["error"]["exit_code"] == r.returncode
    return lines[0]


def walk(home: Path, tmp: Path, must_fail: bool, names: str) -> dict[str, str]:
    """Run every command, in order; return {command: error line}. `names`: a word every line
    of a stateful command's failure holds (the path it is about)."""
    commands = STATEFUL + STATELESS
    results = [mlcloud(commands[0], home, tmp)]
    results += [in_process(args, home, tmp) for args in commands[1:]]
    errors = {}
    for args, r in zip(commands, results, strict=True):
        line = one_line_or_ok(r, args)
        if args in STATEFUL and must_fail:
            assert line is not None, (args, r.stdout)
            assert names in line, (args, line)
        if line:
            errors[" ".join(args)] = line
    return errors


@pytest.fixture
def work(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "train.py").write_text("print('hi')\n")
    yield tmp_path / "work"
    # a home too damaged for `down` leaves its node's agent: end what runs from it
    home = str(tmp_path / "home").encode()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if entry.isdigit() and home in f.read():
                    os.kill(int(entry), signal.SIGKILL)
        except OSError:
            pass


def make_cluster(home: Path, tmp: Path) -> None:
    r = mlcloud(["up", "c1", "--nodes", "1", "--yes"], home, tmp)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems (root only); all unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str = "4m") -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_home_is_a_file(tmp_path, work):
    home = tmp_path / "home"
    home.write_text("oops\n")
    errors = walk(home, tmp_path, must_fail=True, names=str(home))
    assert "is a file, not a directory" in errors["status"]
    assert home.read_text() == "oops\n"  # left as it was


def test_home_under_a_file(tmp_path, work):
    (tmp_path / "blocker").write_text("")
    home = tmp_path / "blocker" / "home"
    walk(home, tmp_path, must_fail=True, names=str(home))


def test_home_is_a_dangling_link(tmp_path, work):
    home = tmp_path / "home"
    home.symlink_to(tmp_path / "gone")
    errors = walk(home, tmp_path, must_fail=True, names=str(home))
    assert "which does not exist" in errors["status"]


def test_corrupt_state_database(tmp_path, work):
    home = tmp_path / "home"
    make_cluster(home, tmp_path)
    db = home / "state.db"
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database, it was overwritten\n" * 100)
    errors = walk(home, tmp_path, must_fail=True, names=str(db))
    assert "mlcloud doctor" in errors["status"]
    assert "--rebuild" in errors["doctor"]


def test_truncated_state_database(tmp_path, work):
    home = tmp_path / "home"
    make_cluster(home, tmp_path)
    db = home / "state.db"
    r = mlcloud(["status"], home, tmp_path)  # checkpoints the WAL into the file
    assert r.returncode == 0
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    with open(db, "r+b") as f:
        f.truncate(1500)
    for args in (["status"], ["down", "c1", "--yes"], ["doctor"]):
        r = mlcloud(args, home, tmp_path)
        line = one_line_or_ok(r, args)
        assert line and str(db) in line, (args, r.stdout, r.stderr)


def test_read_only_home(tmp_path, work, tmpfs):
    mnt = tmpfs()
    home = mnt / "home"
    make_cluster(home, tmp_path)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    errors = walk(home, tmp_path, must_fail=True, names=str(home))
    assert "not writable" in errors["status"]
    assert "cannot write there" in errors["doctor"]


def _fill(mnt: Path) -> None:
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)  # unbuffered: nothing left to flush at close
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_disk(tmp_path, work, tmpfs):
    """A home made before the disk filled: what writes fails in one line; reads may work."""
    mnt = tmpfs("4m")
    home = mnt / "home"
    make_cluster(home, tmp_path)
    _fill(mnt)
    errors = walk(home, tmp_path, must_fail=False, names="")
    assert "the disk is full" in errors["up c2 --yes"].replace(str(home), "HOME")
    assert "No space left" in errors["doctor"]


def test_full_disk_fresh_home(tmp_path, work, tmpfs):
    mnt = tmpfs("1m")
    _fill(mnt)
    home = mnt / "home"
    errors = walk(home, tmp_path, must_fail=False, names="")
    assert errors, "nothing failed on a full disk"
    up = errors.get("up c2 --yes", "").replace(str(home), "HOME")
    assert "the disk is full" in up, up


def test_existing_home_is_never_chmodded(tmp_path, work):
    """MLCLOUD_HOME=/tmp-like (1777, sticky) keeps its mode; its secrets get private dirs."""
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o1777)
    make_cluster(home, tmp_path)
    assert mlcloud(["status"], home, tmp_path).returncode == 0
    assert mlcloud(["down", "c1", "--yes"], home, tmp_path).returncode == 0
    assert oct(home.stat().st_mode & 0o7777) == oct(0o1777)
    assert (home / "state.db").stat().st_mode & 0o077 == 0
    assert (home / "locks").stat().st_mode & 0o077 == 0
