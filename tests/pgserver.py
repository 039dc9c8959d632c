"""A real PostgreSQL for the tests: `initdb` into a temporary directory as an unprivileged user
(the server refuses root), listening on a unix socket there and a loopback port, stopped by
its PID. `make` installs the Debian server (sysdeps) when root."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "mlcloud"  # the database superuser initdb makes


def bindir() -> Path:
    """The newest installed server's binaries (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL's server is not installed: run `make sysdeps` as root")


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.parent.name)
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One server; `database()` gives each test a database (and URL) of its own."""

    def __init__(self):
        self.bin = bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="mlcloud-pg-"))
        self.data, self.socket_dir = self.dir / "data", self.dir / "run"
        self._user = None if os.getuid() else pwd.getpwnam("nobody")
        self.socket_dir.mkdir()
        if self._user:
            for p in (self.dir, self.socket_dir):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
        self._as_user(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust"]
            + ["-E", "UTF8", "--no-sync", "--no-instructions"],
            check=True,
        )
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._names = itertools.count()
        self.start()

    def _as_user(self, argv: list[str], **kw):
        if self._user:
            kw.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
        return subprocess.run(argv, capture_output=True, cwd=self.dir, **kw)

    def start(self) -> None:
        """Start (again, on the same port once it had one) and wait until it answers."""
        self.port = self.port or _free_port()
        argv = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        argv += ["-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1"]
        argv += ["-c", "fsync=off", "-c", "max_connections=300", "-c", "full_page_writes=off"]
        kw = {}
        if self._user:
            kw = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, cwd=self.dir, **kw)
        log.close()
        deadline = time.monotonic() + 30
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.dir / "server.log").read_text()[-2000:]
                raise RuntimeError(f"PostgreSQL did not start: {text}")
            time.sleep(0.05)

    def ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown by PID (SIGINT), waited for."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)

    def url(self, db: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def socket_url(self, db: str) -> str:
        return f"postgresql://{USER}@/{db}?host={self.socket_dir}&port={self.port}"

    def database(self) -> str:
        """A new, empty database; its URL over the loopback port."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def dump(self, url: str) -> str:
        out = subprocess.run(
            [str(self.bin / "pg_dump"), "--no-owner", url],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return out.stdout

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
