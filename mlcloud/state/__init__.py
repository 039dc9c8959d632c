"""State: SQLite in $MLCLOUD_HOME (WAL, BEGIN IMMEDIATE for every read-modify-write), or a
team's PostgreSQL (`MLCLOUD_STATE_URL` or `state_url:` in $MLCLOUD_HOME/config.yaml; pg.py)
behind the same Store: one schema, one version, the same SQL.

The cloud is the source of truth for what exists; this database records intent (a cluster row
is written before any cloud call and dropped only after termination is confirmed), the nodes
last seen, jobs, and an event log.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlcloud.errors import BusyError, MlcloudError, UsageError
from mlcloud.providers.base import NODE_STATUSES, RUNNING, NodeStatus
from mlcloud.state import timeouts

# The jobs table as version 3 made it, which is still today's: SCHEMA creates it and
# _MIGRATE_3 rebuilds a version 2 table into it. A later change to jobs is a migration of its
# own, with its own text in SCHEMA: this one stays version 3's.
_JOBS_V3 = """jobs (
    cluster TEXT NOT NULL,
    uid TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    status TEXT NOT NULL,
    command TEXT NOT NULL,
    num_nodes INTEGER NOT NULL,
    nproc_per_node INTEGER NOT NULL,
    submitted REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    log_path TEXT NOT NULL,
    driver_pid INTEGER,
    PRIMARY KEY (cluster, uid, job_id)
)"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS clusters (
    name TEXT PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    numbered INTEGER NOT NULL DEFAULT 0,
    made_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS nodes (
    cluster TEXT NOT NULL REFERENCES clusters(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    private_ip TEXT NOT NULL,
    root TEXT NOT NULL,
    gpus INTEGER NOT NULL,
    gpu_type TEXT,
    status TEXT NOT NULL,
    python TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (cluster, idx)
);
CREATE TABLE IF NOT EXISTS {_JOBS_V3};
CREATE TABLE IF NOT EXISTS billing (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    uid TEXT NOT NULL,
    provider TEXT NOT NULL,
    node_id TEXT NOT NULL,
    instance_type TEXT NOT NULL,
    region TEXT NOT NULL,
    price REAL NOT NULL,
    start REAL NOT NULL,
    "end" REAL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    uid TEXT NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    node INTEGER
);
CREATE TABLE IF NOT EXISTS pulls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    uid TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    node INTEGER NOT NULL,
    time REAL NOT NULL,
    dest TEXT NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS managed_jobs (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    request TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    restarts INTEGER NOT NULL DEFAULT 0,
    steps_lost INTEGER NOT NULL DEFAULT 0,
    on_demand REAL,
    watcher TEXT NOT NULL DEFAULT '',
    made_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS managed_clusters (
    job TEXT NOT NULL REFERENCES managed_jobs(name) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    cluster TEXT NOT NULL,
    uid TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL,
    region TEXT NOT NULL DEFAULT '',
    zone TEXT NOT NULL DEFAULT '',
    price REAL,
    started REAL NOT NULL,
    ended REAL,
    why TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job, seq)
);
"""

# 2: billing; 3: jobs belong to a cluster's incarnation, node interpreter; 4: events name
# the node they come from (the node agents' events are merged in); 5: pulls (a job's outputs
# brought home, per node), so `down` can say what was never pulled
# 6: saved job requests keep their environment's names only (the values, --env secrets among
# them, are scrubbed from the files older versions wrote)
# 7: clusters.numbered: how many node numbers a cluster handed out (a node's number, its
# `node-K`, is never given again, even once the node is gone)
# 8: clusters.made_by: user@host of the home that made it (a shared store has many homes)
# 9: managed jobs (`mlcloud launch`) and their clusters in order
SCHEMA_VERSION = 9

# From version 2: jobs get the cluster uid (their incarnation) in their key, nodes the
# interpreter found at bootstrap. Jobs of v2 keep uid '' (an incarnation nobody has).
_MIGRATE_3 = f"""
ALTER TABLE nodes ADD COLUMN python TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs RENAME TO jobs_v2;
CREATE TABLE {_JOBS_V3};
INSERT INTO jobs SELECT cluster, '', job_id, status, command, num_nodes, nproc_per_node,
    submitted, ended, exit_code, log_path, driver_pid FROM jobs_v2;
DROP TABLE jobs_v2;
"""

# Cluster lifecycle: INIT (intent written, nodes may be half made) -> UP -> STOPPING -> row dropped.
INIT, UP, STOPPING = "INIT", "UP", "STOPPING"
# Job lifecycle.
JOB_STARTING, JOB_RUNNING = "STARTING", "RUNNING"
JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
JOB_DONE = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)
# A node row's status as read: rows written before mlcloud had states of its own hold the
# cloud's words (EC2's, GCE's lowercased), read as mlcloud's.
_NODE_STATUS: dict[str, NodeStatus] = {
    **{s: s for s in NODE_STATUSES},
    "shutting-down": "stopping",
    "provisioning": "pending",
    "staging": "pending",
    "repairing": "pending",
    "suspending": "stopping",
    "suspended": "stopped",
}


@dataclass(frozen=True)
class NodeRecord:
    idx: int
    node_id: str
    ip: str
    private_ip: str
    root: str
    gpus: int
    gpu_type: str | None
    status: NodeStatus
    python: str = ""  # the interpreter that imports torch there, found at bootstrap


@dataclass(frozen=True)
class ManagedCluster:
    """One cluster a managed job ran on, in the order the watcher made them."""

    seq: int  # 1, 2, ...: the cluster is NAME-seq
    cluster: str
    uid: str
    provider: str
    region: str
    zone: str
    price: float | None  # USD/h for the whole cluster, as planned
    started: float
    ended: float | None
    why: str  # why it ended ('' while it runs): lost, capacity, moved, done, cancelled


@dataclass(frozen=True)
class ManagedJob:
    """A job `mlcloud launch` keeps alive across clusters (README, "Managed jobs")."""

    name: str
    status: str  # JOB_RUNNING, or how it ended (JOB_DONE)
    spec: dict
    request: dict  # what to run: script, args, nproc, env names, pull destination
    created: float
    updated: float
    ended: float | None
    exit_code: int | None
    restarts: int
    steps_lost: int
    on_demand: float | None  # USD/h of the same nodes on demand in the first placement
    watcher: str  # who watches it: `pid@host` of a launch, or `autoscale` (--detach)
    made_by: str
    clusters: tuple[ManagedCluster, ...] = ()

    @property
    def current(self) -> ManagedCluster | None:
        """The cluster the job runs on now (the newest not ended)."""
        live = [c for c in self.clusters if c.ended is None]
        return live[-1] if live else None


@dataclass(frozen=True)
class ClusterRecord:
    name: str
    uid: str
    provider: str
    status: str
    spec: dict
    owner: str
    created: float
    updated: float
    nodes: tuple[NodeRecord, ...] = field(default=())
    made_by: str = ""  # user@host of the home that made it


@dataclass(frozen=True)
class JobRecord:
    cluster: str
    uid: str  # the cluster's incarnation: a cluster made again under a name starts at job 1
    job_id: int
    status: str
    command: str
    num_nodes: int
    nproc_per_node: int
    submitted: float
    ended: float | None
    exit_code: int | None
    log_path: str
    driver_pid: int | None


class ClusterExists(MlcloudError):
    pass


class Store:
    """One connection to the state database; cheap to open, safe across processes."""

    def __init__(self, path: Path, busy_timeout: float | None = None):
        self.path = path
        if busy_timeout is None:
            busy_timeout = timeouts.seconds("DB_BUSY_TIMEOUT")
        self._busy_timeout = busy_timeout
        try:
            self.db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        except sqlite3.DatabaseError as e:
            raise self._translate(e) from e
        self.db.row_factory = sqlite3.Row
        try:
            self._wal()
            self.db.execute("PRAGMA foreign_keys=ON")
            # FULL: a committed intent row survives a power cut (NORMAL may lose the last
            # transactions in WAL mode), and the writes are few
            self.db.execute("PRAGMA synchronous=FULL")
            (version,) = self.db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise MlcloudError(
                    f"state database {path} has schema {version}, newer than this mlcloud "
                    f"({SCHEMA_VERSION}); upgrade mlcloud"
                )
            if version < SCHEMA_VERSION:
                self._migrate(version)
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise self._translate(e) from e
        if path.exists() and path.stat().st_mode & 0o077:
            path.chmod(0o600)

    def _wal(self) -> None:
        """Switch to WAL. On a new file, processes racing here get "locked" at once (the busy
        handler is not called for a journal-mode change), so retry until the busy timeout."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _migrate(self, version: int) -> None:
        """Bring the schema to SCHEMA_VERSION in one transaction (a second process racing
        here waits on BEGIN IMMEDIATE, then finds the work done)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = self.db.execute("PRAGMA user_version").fetchone()
            if 0 < version < 3:
                for statement in _MIGRATE_3.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
            columns = [r[1] for r in self.db.execute("PRAGMA table_info(events)")]
            if 0 < version < 4 and columns and "node" not in columns:
                self.db.execute("ALTER TABLE events ADD COLUMN node INTEGER")
            columns = [r[1] for r in self.db.execute("PRAGMA table_info(clusters)")]
            if 0 < version < 7 and columns and "numbered" not in columns:
                self.db.execute(
                    "ALTER TABLE clusters ADD COLUMN numbered INTEGER NOT NULL DEFAULT 0"
                )
            if 0 < version < 8 and columns and "made_by" not in columns:
                self.db.execute("ALTER TABLE clusters ADD COLUMN made_by TEXT NOT NULL DEFAULT ''")
            if version < SCHEMA_VERSION:
                for statement in SCHEMA.split(";"):  # every one IF NOT EXISTS: safe to rerun
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            if 0 < version < 6:
                self._scrub_requests()
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _scrub_requests(self) -> None:
        """Rewrite each saved job request that still holds its environment's values with the
        names only (version 6); a file that is gone or unreadable is left as it is."""
        from mlcloud.state import atomic

        for (log_path,) in self.db.execute("SELECT log_path FROM jobs"):
            path = Path(log_path + ".request.json")
            try:
                d = json.loads(path.read_text())
                if "envs" not in d:
                    continue
                d["env_names"] = sorted(d.pop("envs"))
                atomic.write(path, json.dumps(d).encode())
            except (OSError, ValueError, TypeError, AttributeError):
                continue

    def close(self) -> None:
        self.db.close()

    def reopen(self) -> Store:
        """A connection of its own to the same store (a connection is one thread's)."""
        return Store(self.path, self._busy_timeout)

    def where(self) -> str:
        """The store as a person reads it: `sqlite PATH` or `postgresql URL` (no password)."""
        return f"sqlite {self.path}"

    def schema_version(self) -> int:
        (version,) = self._read("PRAGMA user_version")[0]
        return version

    def identity(self) -> str:
        """Who owns what this store made (the mlcloud-owner tag, `gc`): this home's id; a
        shared store has one of its own, so a team's homes and a fleet's runners are one."""
        from mlcloud.state import paths

        return paths.home_id()

    def _translate(self, e: sqlite3.DatabaseError) -> MlcloudError:
        """One line naming the file and what to do, for each way the database can fail."""
        text = str(e)
        if "locked" in text or "busy" in text:
            return BusyError(
                f"state database {self.path} stayed busy for {self._busy_timeout:.0f}s "
                "(another mlcloud command is writing); retry when it finishes"
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return MlcloudError(
                f"state database {self.path} is damaged ({text}); run `mlcloud doctor` to "
                "check it, `mlcloud doctor --rebuild` to rebuild it from the clouds' tags"
            )
        if "full" in text or ("I/O error" in text and _disk_full(self.path.parent)):
            return MlcloudError(
                f"state database {self.path}: the disk is full; free space there and retry"
            )
        if "readonly" in text or "unable to open" in text:
            return MlcloudError(
                f"state database {self.path} cannot be written ({text}); MLCLOUD_HOME must be "
                "a directory you can write (`mlcloud doctor` checks it)"
            )
        return MlcloudError(f"state database {self.path}: {text} (`mlcloud doctor` checks it)")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so read-modify-write is atomic."""
        try:
            if self.db.in_transaction:
                yield self.db
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            raise self._translate(e) from e

    def _write(self, sql: str, args: tuple = ()):
        """A change that is one statement, atomic on its own (on a shared store one round
        trip, no transaction around it); returns its cursor (rowcount)."""
        with self.tx() as db:
            return db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._translate(e) from e

    # clusters

    def create_cluster(self, name: str, uid: str, provider: str, spec: dict, owner: str) -> None:
        now = time.time()
        with self.tx() as db:
            if db.execute("SELECT 1 FROM clusters WHERE name=?", (name,)).fetchone():
                raise ClusterExists(f"cluster {name!r} already exists")
            db.execute(
                "INSERT INTO clusters (name, uid, provider, status, spec, owner, created, "
                "updated, made_by) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, uid, provider, INIT, _stored_spec(spec), owner, now, now, whoami()),
            )
            self._event(db, name, uid, "intent", f"cluster {name} recorded before provisioning")

    def get_cluster(self, name: str) -> ClusterRecord | None:
        rows = self._read("SELECT * FROM clusters WHERE name=?", (name,))
        if not rows:
            return None
        nodes = self._read("SELECT * FROM nodes WHERE cluster=? ORDER BY idx", (name,))
        return _cluster(rows[0], tuple(_node(n) for n in nodes))

    def list_clusters(self) -> list[ClusterRecord]:
        by_cluster: dict[str, list[NodeRecord]] = {}
        for n in self._read("SELECT * FROM nodes ORDER BY cluster, idx"):
            by_cluster.setdefault(n["cluster"], []).append(_node(n))
        return [
            _cluster(r, tuple(by_cluster.get(r["name"], ())))
            for r in self._read("SELECT * FROM clusters ORDER BY name")
        ]

    def set_status(self, name: str, status: str) -> None:
        self._write(
            "UPDATE clusters SET status=?, updated=? WHERE name=?", (status, time.time(), name)
        )

    def set_spec(self, name: str, spec: dict) -> None:
        self._write(
            "UPDATE clusters SET spec=?, updated=? WHERE name=?",
            (_stored_spec(spec), time.time(), name),
        )

    def number_nodes(self, name: str, count: int, floor: int = 0) -> int:
        """The first of `count` node numbers for a cluster, recorded as used: one past the
        highest it ever handed out, or `floor` if that is higher (nodes made before the
        cluster kept count). A number is never handed out twice, so a node's number (its
        `node-K`, its process tag) names one node for the cluster's whole life."""
        with self.tx() as db:
            row = db.execute("SELECT numbered FROM clusters WHERE name=?", (name,)).fetchone()
            if row is None:
                raise MlcloudError(f"cluster {name!r} is no longer in state")
            first = max(row["numbered"], floor)
            db.execute("UPDATE clusters SET numbered=? WHERE name=?", (first + count, name))
            return first

    def set_nodes(self, name: str, nodes: list[NodeRecord]) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM nodes WHERE cluster=?", (name,))
            db.executemany(
                "INSERT INTO nodes VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        name,
                        n.idx,
                        n.node_id,
                        n.ip,
                        n.private_ip,
                        n.root,
                        n.gpus,
                        n.gpu_type,
                        n.status,
                        n.python,
                    )
                    for n in nodes
                ],
            )

    def delete_cluster(self, name: str) -> None:
        with self.tx() as db:
            row = db.execute("SELECT uid FROM clusters WHERE name=?", (name,)).fetchone()
            if row:
                db.execute("DELETE FROM clusters WHERE name=?", (name,))
                self._event(db, name, row["uid"], "deleted", "termination confirmed; state dropped")

    # jobs

    def new_job(
        self,
        cluster: str,
        uid: str,
        command: str,
        num_nodes: int,
        nproc: int,
        log_dir: Path,
        driver_pid: int | None = None,
    ) -> JobRecord:
        """The next job of this incarnation of the cluster (the first is 1), followed from
        the start by driver_pid (the process starting it)."""
        with self.tx() as db:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(job_id), 0) FROM jobs WHERE cluster=? AND uid=?",
                (cluster, uid),
            ).fetchone()
            job_id = last + 1
            log_path = str(log_dir / f"{uid}.job-{job_id}.log")
            db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    cluster,
                    uid,
                    job_id,
                    JOB_STARTING,
                    command,
                    num_nodes,
                    nproc,
                    time.time(),
                    None,
                    None,
                    log_path,
                    driver_pid,
                ),
            )
        job = self.get_job(cluster, job_id, uid)
        assert job is not None
        return job

    def update_job(self, cluster: str, uid: str, job_id: int, **fields: object) -> None:
        allowed = {"status", "ended", "exit_code", "driver_pid"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k}=?" for k in fields)
        self._write(
            f"UPDATE jobs SET {sets} WHERE cluster=? AND uid=? AND job_id=?",  # noqa: S608
            (*fields.values(), cluster, uid, job_id),
        )

    def claim_job(
        self, cluster: str, uid: str, job_id: int, was: int | None, pid: int | None
    ) -> bool:
        """Make pid the job's follower if the follower is still `was`: of two commands that
        find a job unfollowed, one adopts it."""
        cur = self._write(
            "UPDATE jobs SET driver_pid=? WHERE cluster=? AND uid=? AND job_id=? "
            "AND driver_pid IS ?",
            (pid, cluster, uid, job_id, was),
        )
        return cur.rowcount == 1

    def get_job(
        self, cluster: str, job_id: int | None = None, uid: str | None = None
    ) -> JobRecord | None:
        """A job by id (default: the newest), of incarnation `uid` (default: the newest one
        that has jobs, so the jobs of a torn-down cluster can still be read)."""
        jobs = self.jobs(cluster, uid)
        if uid is None and jobs:
            newest = max(jobs, key=lambda j: j.submitted).uid
            jobs = [j for j in jobs if j.uid == newest]
        if job_id is not None:
            jobs = [j for j in jobs if j.job_id == job_id]
        return jobs[-1] if jobs else None

    def jobs(self, cluster: str | None = None, uid: str | None = None) -> list[JobRecord]:
        if cluster is None:
            rows = self._read("SELECT * FROM jobs ORDER BY cluster, submitted, job_id")
        elif uid is None:
            rows = self._read(
                "SELECT * FROM jobs WHERE cluster=? ORDER BY submitted, job_id", (cluster,)
            )
        else:
            rows = self._read(
                "SELECT * FROM jobs WHERE cluster=? AND uid=? ORDER BY job_id", (cluster, uid)
            )
        return [JobRecord(**dict(r)) for r in rows]

    # managed jobs

    def create_managed(
        self, name: str, spec: dict, request: dict, on_demand: float | None, watcher: str
    ) -> ManagedJob:
        """A new managed job; one that ended under this name is replaced (its clusters' events
        and billing stay), one still running is refused."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT status FROM managed_jobs WHERE name=?", (name,)).fetchone()
            if row and row["status"] not in JOB_DONE:
                raise ClusterExists(f"managed job {name!r} already exists")
            db.execute("DELETE FROM managed_jobs WHERE name=?", (name,))
            db.execute(
                "INSERT INTO managed_jobs (name, status, spec, request, created, updated, "
                "on_demand, watcher, made_by) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    JOB_RUNNING,
                    _stored_spec(spec),
                    json.dumps(request),
                    now,
                    now,
                    on_demand,
                    watcher,
                    whoami(),
                ),
            )
        job = self.get_managed(name)
        assert job is not None
        return job

    def get_managed(self, name: str) -> ManagedJob | None:
        rows = self._read("SELECT * FROM managed_jobs WHERE name=?", (name,))
        if not rows:
            return None
        clusters = self._read("SELECT * FROM managed_clusters WHERE job=? ORDER BY seq", (name,))
        return _managed(rows[0], tuple(_managed_cluster(c) for c in clusters))

    def list_managed(self) -> list[ManagedJob]:
        by_job: dict[str, list[ManagedCluster]] = {}
        for c in self._read("SELECT * FROM managed_clusters ORDER BY job, seq"):
            by_job.setdefault(c["job"], []).append(_managed_cluster(c))
        return [
            _managed(r, tuple(by_job.get(r["name"], ())))
            for r in self._read("SELECT * FROM managed_jobs ORDER BY created, name")
        ]

    def update_managed(self, name: str, **fields: object) -> None:
        allowed = {"status", "ended", "exit_code", "restarts", "steps_lost", "watcher"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k}=?" for k in [*fields, "updated"])
        self._write(
            f"UPDATE managed_jobs SET {sets} WHERE name=?",  # noqa: S608
            (*fields.values(), time.time(), name),
        )

    def claim_managed(self, name: str, was: str, watcher: str) -> bool:
        """Make `watcher` the job's watcher if it is still `was`: of two launches that find
        the job unwatched, one resumes it."""
        cur = self._write(
            "UPDATE managed_jobs SET watcher=?, updated=? WHERE name=? AND watcher=?",
            (watcher, time.time(), name, was),
        )
        return cur.rowcount == 1

    def add_managed_cluster(
        self, job: str, provider: str, region: str, zone: str, price: float | None
    ) -> ManagedCluster:
        """The job's next cluster, NAME-seq, recorded before it is made (so a killed watcher's
        successor finds it and never makes a second)."""
        with self.tx() as db:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM managed_clusters WHERE job=?", (job,)
            ).fetchone()
            seq = last + 1
            db.execute(
                "INSERT INTO managed_clusters (job, seq, cluster, provider, region, zone, price, "
                "started) VALUES (?,?,?,?,?,?,?,?)",
                (job, seq, f"{job}-{seq}", provider, region, zone, price, time.time()),
            )
        managed = self.get_managed(job)
        assert managed is not None
        return managed.clusters[-1]

    def update_managed_cluster(self, job: str, seq: int, **fields: object) -> None:
        allowed = {"uid", "region", "zone", "price", "ended", "why"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k}=?" for k in fields)
        self._write(
            f"UPDATE managed_clusters SET {sets} WHERE job=? AND seq=?",  # noqa: S608
            (*fields.values(), job, seq),
        )

    def managed_of(self, cluster: str) -> str | None:
        """The managed job a cluster was made for, if any."""
        rows = self._read("SELECT job FROM managed_clusters WHERE cluster=?", (cluster,))
        return rows[0]["job"] if rows else None

    # billing: kept after teardown, so `mlcloud cost` can report torn-down clusters

    def open_billing(self, intervals: list) -> None:
        with self.tx() as db:
            db.executemany(
                "INSERT INTO billing (cluster, uid, provider, node_id, instance_type, region, "
                'price, start, "end") VALUES (?,?,?,?,?,?,?,?,NULL)',
                [
                    (
                        i.cluster,
                        i.uid,
                        i.provider,
                        i.node_id,
                        i.instance_type,
                        i.region,
                        i.price,
                        i.start,
                    )
                    for i in intervals
                ],
            )

    def close_billing(self, uid: str, end: float) -> None:
        self._write('UPDATE billing SET "end"=? WHERE uid=? AND "end" IS NULL', (end, uid))

    def close_node_billing(self, uid: str, node_id: str, end: float) -> None:
        """One node stopped billing (lost, replaced, or shrunk away) while the cluster stays."""
        self._write(
            'UPDATE billing SET "end"=? WHERE uid=? AND node_id=? AND "end" IS NULL',
            (end, uid, node_id),
        )

    def billing(self, cluster: str | None = None) -> list:
        from mlcloud.spec.cost import Interval

        rows = (
            self._read("SELECT * FROM billing ORDER BY id")
            if cluster is None
            else self._read("SELECT * FROM billing WHERE cluster=? ORDER BY id", (cluster,))
        )
        return [
            Interval(
                r["cluster"],
                r["uid"],
                r["provider"],
                r["node_id"],
                r["instance_type"],
                r["region"],
                r["price"],
                r["start"],
                r["end"],
            )
            for r in rows
        ]

    # events

    def event(self, cluster: str, kind: str, message: str, node: int | None = None) -> None:
        """Record an event; node: the position of the node it is about, where one applies."""
        self._write(
            "INSERT INTO events (cluster, uid, time, kind, message, node) VALUES "
            "(?, COALESCE((SELECT uid FROM clusters WHERE name=?), ''), ?, ?, ?, ?)",
            (cluster, cluster, time.time(), kind, message, node),
        )

    @staticmethod
    def _event(
        db: sqlite3.Connection,
        cluster: str,
        uid: str,
        kind: str,
        message: str,
        node: int | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO events (cluster, uid, time, kind, message, node) VALUES (?,?,?,?,?,?)",
            (cluster, uid, time.time(), kind, message, node),
        )

    def events(self, cluster: str) -> list[tuple[float, str, str]]:
        rows = self._read(
            "SELECT time, kind, message FROM events WHERE cluster=? ORDER BY id", (cluster,)
        )
        return [(r["time"], r["kind"], r["message"]) for r in rows]

    def merge_events(
        self, cluster: str, uid: str, events: list[tuple[float, str, int, str]]
    ) -> int:
        """Add (time, kind, node, message) events read from the nodes, skipping those already
        here; returns how many were new."""
        added = 0
        with self.tx() as db:
            for t, kind, node, message in events:
                if db.execute(
                    "SELECT 1 FROM events WHERE cluster=? AND uid=? AND time=? AND kind=? "
                    "AND node IS ? AND message=?",
                    (cluster, uid, t, kind, node, message),
                ).fetchone():
                    continue
                db.execute(
                    "INSERT INTO events (cluster, uid, time, kind, message, node) "
                    "VALUES (?,?,?,?,?,?)",
                    (cluster, uid, t, kind, message, node),
                )
                added += 1
        return added

    # pulls

    def record_pull(
        self, cluster: str, uid: str, job_id: int, dest: str, nodes: dict[int, tuple[int, int]]
    ) -> None:
        """nodes: index -> (files, bytes) of each node pulled."""
        now = time.time()
        with self.tx() as db:
            db.executemany(
                "INSERT INTO pulls (cluster, uid, job_id, node, time, dest, files, bytes) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [(cluster, uid, job_id, i, now, dest, f, b) for i, (f, b) in nodes.items()],
            )

    def pulled_nodes(self, cluster: str, uid: str, job_id: int, since: float) -> set[int]:
        """The nodes whose outputs of this job were pulled at `since` or later."""
        rows = self._read(
            "SELECT DISTINCT node FROM pulls WHERE cluster=? AND uid=? AND job_id=? AND time>=?",
            (cluster, uid, job_id, since),
        )
        return {r["node"] for r in rows}

    def last_uid(self, cluster: str) -> str | None:
        """The uid of the newest incarnation of a cluster that left events (it may be gone)."""
        rows = self._read(
            "SELECT uid FROM events WHERE cluster=? AND uid != '' ORDER BY id DESC LIMIT 1",
            (cluster,),
        )
        return rows[0]["uid"] if rows else None

    def event_log(self, cluster: str, uid: str) -> list[tuple[float, str, int | None, str]]:
        """(time, kind, node, message) of one incarnation of a cluster, oldest first."""
        rows = self._read(
            "SELECT time, kind, node, message FROM events WHERE cluster=? AND uid=? "
            "ORDER BY time, id",
            (cluster, uid),
        )
        return [(r["time"], r["kind"], r["node"], r["message"]) for r in rows]


def _node(r: sqlite3.Row) -> NodeRecord:
    return NodeRecord(
        idx=r["idx"],
        node_id=r["node_id"],
        ip=r["ip"],
        private_ip=r["private_ip"],
        root=r["root"],
        gpus=r["gpus"],
        gpu_type=r["gpu_type"],
        status=_NODE_STATUS.get(r["status"], RUNNING),  # a word no built-in wrote: as before
        python=r["python"],
    )


def _cluster(r: sqlite3.Row, nodes: tuple[NodeRecord, ...]) -> ClusterRecord:
    return ClusterRecord(
        name=r["name"],
        uid=r["uid"],
        provider=r["provider"],
        status=r["status"],
        spec=json.loads(r["spec"]),
        owner=r["owner"],
        created=r["created"],
        updated=r["updated"],
        nodes=nodes,
        made_by=r["made_by"],
    )


def _managed(r: sqlite3.Row, clusters: tuple[ManagedCluster, ...]) -> ManagedJob:
    return ManagedJob(
        name=r["name"],
        status=r["status"],
        spec=json.loads(r["spec"]),
        request=json.loads(r["request"]),
        created=r["created"],
        updated=r["updated"],
        ended=r["ended"],
        exit_code=r["exit_code"],
        restarts=r["restarts"],
        steps_lost=r["steps_lost"],
        on_demand=r["on_demand"],
        watcher=r["watcher"],
        made_by=r["made_by"],
        clusters=clusters,
    )


def _managed_cluster(r: sqlite3.Row) -> ManagedCluster:
    return ManagedCluster(
        seq=r["seq"],
        cluster=r["cluster"],
        uid=r["uid"],
        provider=r["provider"],
        region=r["region"],
        zone=r["zone"],
        price=r["price"],
        started=r["started"],
        ended=r["ended"],
        why=r["why"],
    )


def _stored_spec(spec: dict) -> str:
    """A spec as state keeps it: the job's environment by name only, never its values
    (secrets must not sit in state.db)."""
    if "envs" in spec:
        spec = {**spec, "envs": sorted(spec["envs"] or {})}
    return json.dumps(spec)


def _disk_full(folder: Path) -> bool:
    """SQLite says "disk I/O error" when it cannot grow its WAL index on a full disk."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine (a job's driver) still runs."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def whoami() -> str:
    """user@host of this home: who made a cluster, shown by `status` (a shared store has
    many homes)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (containers)
        import os

        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def state_url() -> str | None:
    """The shared store's libpq URL: MLCLOUD_STATE_URL, else `state_url:` in
    $MLCLOUD_HOME/config.yaml; None means SQLite in the home."""
    import os

    from mlcloud.state import paths

    url = os.environ.get("MLCLOUD_STATE_URL", "").strip()
    if not url:
        config = paths.home_path() / "config.yaml"
        if not config.is_file():
            return None
        import yaml

        try:
            data = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"{config}: {_first_line(e)}; fix or remove it") from None
        url = str(data.get("state_url") or "").strip() if isinstance(data, dict) else ""
        if not url:
            return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise UsageError(
            "state URL: expected postgresql://USER@HOST/DB (a libpq URL) in MLCLOUD_STATE_URL "
            "or state_url: of config.yaml"
        )
    return url


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def open_store() -> Store:
    """The store this home uses: PostgreSQL where a state URL is set, else SQLite."""
    url = state_url()
    if url:
        from mlcloud.state import pg

        return pg.PgStore(url)
    from mlcloud.state import paths

    return Store(paths.home() / "state.db")


@contextmanager
def cluster_lock(
    name: str, timeout: float = 30.0, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the cluster for a change (up, down, a job launch, a controller's record): a file
    lock in the home, or on a shared store an advisory lock, freed when its holder dies.
    on_wait hears once who holds it, if anyone does."""
    url = state_url()
    if url:
        from mlcloud.state import pg

        with pg.cluster_lock(url, name, timeout, on_wait):
            yield
        return
    from filelock import FileLock, Timeout

    from mlcloud.state import paths

    lock = FileLock(str(paths.locks_dir() / f"{name}.lock"), mode=0o600)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise BusyError(
            f"cluster {name!r} is busy: another mlcloud command (up, down or a job launch) "
            f"held its lock for {timeout:.0f}s; retry when it finishes"
        ) from None
    try:
        yield
    finally:
        lock.release()


def lead(name: str) -> Callable[[], None] | None:
    """Lead the control of a cluster unless another controller does (`autoscale --all`):
    the function that lets go, or None. On a shared store an advisory lock on a connection of
    its own, whoever's it is freed with its holder's connection (a killed or lost controller);
    in a home, a file lock."""
    url = state_url()
    if url:
        from mlcloud.state import pg

        return pg.lead(url, name)
    from filelock import FileLock, Timeout

    from mlcloud.state import paths

    lock = FileLock(str(paths.locks_dir() / f"{name}.lead"), mode=0o600)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock.release
