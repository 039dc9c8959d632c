"""`mlcloud doctor`: check the home, the state database, the locks and the clusters' nodes,
and rebuild a damaged database from what outlives it.

What outlives a lost state.db: what every registered provider finds without state
(`discover`: the clouds' tags, the local provider's node directories, the ssh provider's host
registries), and what a provider keeps of a cluster's spec (`recorded`: the ssh hosts).
Recovered clusters are rows with their nodes, enough for `down`.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlcloud import providers, state
from mlcloud.errors import MlcloudError, UsageError
from mlcloud.providers.base import AuthError, ClusterRef, Provider, ProvisionRequest
from mlcloud.provision import handle
from mlcloud.state import paths

OK, WARN, FAIL = "ok", "warn", "fail"
PRIVATE = ("keys", "ssh", "locks", "logs")  # directories that hold secrets or other users' eyes


@dataclass(frozen=True)
class Check:
    area: str  # home, database, locks, nodes
    subject: str  # the path, cluster or node checked
    status: str  # ok, warn, fail
    detail: str  # one line: what was found and, when not ok, what to do


@dataclass(frozen=True)
class Recovered:
    name: str
    uid: str
    provider: str
    nodes: int
    region: str | None = None


@dataclass
class Rebuild:
    moved_to: str | None = None  # where the damaged database went
    clusters: list[Recovered] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be recovered, and why
    # providers asked for that could not be searched: the rebuild may lack their clusters
    unsearched: list[str] = field(default_factory=list)
    # clouds left out of the default set because this machine has no credentials for them
    skipped: list[str] = field(default_factory=list)


# --- checks -------------------------------------------------------------------------------------


def check_home(home: Path) -> list[Check]:
    if home.is_symlink() and not home.exists():
        target = os.readlink(home)
        return [Check("home", str(home), FAIL, f"links to {target}, which does not exist")]
    if not home.exists():
        above = next(p for p in home.parents if p.exists())
        if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
            what = "a file" if not above.is_dir() else "not writable"
            return [
                Check(
                    "home",
                    str(home),
                    FAIL,
                    f"cannot be created: {above} is {what}; set MLCLOUD_HOME elsewhere",
                )
            ]
        return [Check("home", str(home), OK, "not created yet; the first command makes it")]
    if not home.is_dir():
        return [
            Check(
                "home",
                str(home),
                FAIL,
                "is a file, not a directory: move it aside or set MLCLOUD_HOME elsewhere",
            )
        ]
    checks = [_writable(home)]
    for name in PRIVATE:
        p = home / name
        if p.is_dir() and p.stat().st_mode & 0o077:
            checks.append(Check("home", str(p), WARN, f"readable by others: chmod 700 {p}"))
    db = home / "state.db"
    if db.is_file() and db.stat().st_mode & 0o077:
        checks.append(Check("home", str(db), WARN, f"readable by others: chmod 600 {db}"))
    mode = home.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        checks.append(Check("home", str(home), WARN, "writable by everyone without the sticky bit"))
    return checks


def _writable(home: Path) -> Check:
    """Write, sync and remove a small file: catches a read-only mount and a full disk."""
    probe = home / f".doctor-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 65536)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as e:
        return Check(
            "home",
            str(home),
            FAIL,
            f"cannot write there ({e.strerror}): free space or fix permissions, or set "
            "MLCLOUD_HOME to a writable directory",
        )
    return Check("home", str(home), OK, "a writable directory")


def check_database(db: Path) -> list[Check]:
    if db.is_symlink() and not db.exists():  # dangling or a loop: no command can create it
        target = os.readlink(db)
        return [
            Check("database", str(db), FAIL, f"links to {target}, which is unusable: {_REBUILD}")
        ]
    if not db.exists():
        return [Check("database", str(db), OK, "none yet; the first command creates it")]
    if not db.is_file():  # a directory, or a device such as /dev/null that sqlite reads as empty
        return [Check("database", str(db), FAIL, f"not a regular file: {_REBUILD}")]
    try:
        conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=2)
        try:
            (result,) = conn.execute("PRAGMA integrity_check").fetchone()
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if "locked" in str(e) or "busy" in str(e):  # in use, not damaged: never rebuilt
            return [Check("database", str(db), WARN, "busy: another mlcloud command is writing")]
        return [Check("database", str(db), FAIL, f"{e}: {_REBUILD}")]
    if result != "ok":
        return [Check("database", str(db), FAIL, f"integrity check: {result}: {_REBUILD}")]
    if version > state.SCHEMA_VERSION:
        return [
            Check(
                "database",
                str(db),
                FAIL,
                f"schema {version} is newer than this mlcloud's ({state.SCHEMA_VERSION}): "
                "upgrade mlcloud",
            )
        ]
    missing = {"clusters", "nodes", "jobs"} - tables
    if version and missing:
        lost = ", ".join(sorted(missing))
        return [Check("database", str(db), FAIL, f"tables missing ({lost}): {_REBUILD}")]
    unwritable = _unwritable(db)
    if unwritable:
        return [unwritable]
    note = "" if version == state.SCHEMA_VERSION else " (the next command migrates it)"
    return [Check("database", str(db), OK, f"integrity ok, schema {version}{note}")]


def _unwritable(db: Path) -> Check | None:
    """sqlite opens a file it cannot write read-only without a word, so reads pass: open the
    database and its journal files for writing ourselves (an immutable file, `chattr +i`, or a
    read-only mount refuse it even to root)."""
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if not f.exists():
            continue
        try:
            os.close(os.open(f, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            return Check(
                "database",
                str(f),
                FAIL,
                f"cannot be written ({e.strerror}): every command that changes state fails; "
                "make it writable again (`lsattr`/`chattr -i`, the mount's options)",
            )
    return None


_REBUILD = "`mlcloud doctor --rebuild` moves it aside and rebuilds it from the clouds' tags"


def check_locks(locks: Path, clusters: set[str] | None) -> list[Check]:
    """Held locks (a command is running) and lock files of clusters no longer in state.
    Lock files are never deleted: unlinking one another process has open breaks the lock."""
    if not locks.is_dir():
        return []
    from filelock import FileLock, Timeout

    checks = []
    for f in sorted(locks.glob("*.lock")):
        name = f.name.removesuffix(".lock")
        lock = FileLock(str(f))
        try:
            lock.acquire(timeout=0)
            lock.release()
        except Timeout:
            checks.append(Check("locks", name, OK, "held: an mlcloud command is working on it"))
            continue
        except OSError as e:
            checks.append(Check("locks", str(f), FAIL, f"cannot be opened ({e.strerror})"))
            continue
        if clusters is not None and name not in clusters:
            checks.append(
                Check("locks", str(f), OK, "left by a cluster no longer in state (harmless)")
            )
    return checks


def check_nodes(store: state.Store, timeout: float) -> list[Check]:
    """Ask every node of every cluster to run `true`, all at once; a node that has not
    answered within `timeout` is reported, and its thread is left behind (daemon)."""
    from mlcloud.remote.shell import path_arg

    jobs: list[tuple[str, str, object, str]] = []
    for rec in store.list_clusters():
        try:
            h = handle.open_cluster(store, rec.name, need_up=False)
        except MlcloudError as e:
            jobs.append((rec.name, "-", e, ""))
            continue
        for n, t in zip(h.nodes, h.transports, strict=True):
            jobs.append((rec.name, f"node{n.idx} ({n.node_id})", t, n.root))
    results: dict[int, str | None] = {}

    def probe(i: int, t, root: str) -> None:
        try:
            r = t.run(f"test -d {path_arg(root)}", timeout=timeout)
            results[i] = (
                None if r.exit_code == 0 else f"reachable, but its directory {root} is gone"
            )
        except Exception as e:  # any failure is the answer here, reported per node
            results[i] = " ".join(str(e).split()) or type(e).__name__
        finally:
            try:
                t.close()
            except Exception:  # noqa: S110  (closing a dead connection may fail too)
                pass

    threads = []
    for i, (_, _, t, root) in enumerate(jobs):
        if isinstance(t, Exception):
            results[i] = str(t)
            continue
        th = threading.Thread(target=probe, args=(i, t, root), daemon=True)
        th.start()
        threads.append(th)
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    checks = []
    for i, (name, node, _, _) in enumerate(jobs):
        if i not in results:
            detail, status = f"no answer within {timeout:g}s", FAIL
        elif results[i] is None:
            detail, status = "reachable", OK
        else:
            detail, status = results[i], FAIL
        if status == FAIL:
            detail += f"; `mlcloud down {name}` if it is gone for good"
        checks.append(Check("nodes", f"{name} {node}", status, detail))
    return checks


def run_checks(timeout: float = 10.0) -> list[Check]:
    """Every check that the state of the home allows, in order."""
    home = paths.home_path()
    checks = check_home(home)
    if any(c.status == FAIL for c in checks) or not home.exists():
        return checks
    url = state.state_url()
    if url:
        return checks + check_shared(timeout)
    db = home / "state.db"
    checks += check_database(db)
    clusters = None
    store = None
    if checks[-1].status == OK and db.exists():  # (busy: its readers would wait, skip them)
        try:
            store = state.Store(db)
            clusters = {c.name for c in store.list_clusters()}
        except MlcloudError as e:
            checks.append(Check("database", str(db), FAIL, str(e)))
    checks += check_locks(home / "locks", clusters)
    if store is not None:
        try:
            checks += check_nodes(store, timeout)
        finally:
            store.close()
    return checks


def check_shared(timeout: float) -> list[Check]:
    """The shared store: reachable, its schema version, how long a round trip takes; then
    the nodes of every cluster in it (the file locks of a home play no part there)."""
    started = time.monotonic()
    try:
        store = state.open_store()
    except MlcloudError as e:
        return [Check("database", "postgresql", FAIL, str(e))]
    try:
        version = store.schema_version()
        ms = (time.monotonic() - started) * 1000
        checks = [
            Check("database", store.where(), OK, f"reachable ({ms:.0f} ms), schema {version}")
        ]
        return checks + check_nodes(store, timeout)
    finally:
        store.close()


def database_damaged() -> bool:
    """Whether state.db exists and is damaged (not merely busy or missing)."""
    db = paths.home_path() / "state.db"
    return any(c.status == FAIL for c in check_database(db))


# --- rebuild ------------------------------------------------------------------------------------


def rebuild(providers_: list[str], regions: list[str], named: bool = True) -> Rebuild:
    """Move a damaged state.db aside (state.db.corrupt-<time>) and rebuild it: a cluster row
    with its nodes for each cluster this home made that the given providers still hold. A
    healthy database (a wiped one that a later command recreated) keeps its rows and gains
    the clusters it does not know.

    named: the user chose the providers. Otherwise (every provider), a cloud this machine has
    no credentials for is skipped and named, as `gc` does: nothing of this home can be there
    to find, so the rebuild is still whole."""
    if state.state_url():
        raise UsageError(
            "doctor --rebuild rebuilds a home's own state.db; with MLCLOUD_STATE_URL set the "
            "state is the shared store's: unset it to rebuild this home's"
        )
    home = paths.home()
    db = home / "state.db"
    out = Rebuild()
    if database_damaged():
        suffix = time.strftime("%Y%m%d-%H%M%S")
        for extra in ("", "-wal", "-shm"):
            f = home / f"state.db{extra}"
            if f.exists() or f.is_symlink():
                f.rename(home / f"state.db.corrupt-{suffix}{extra}")
        out.moved_to = str(home / f"state.db.corrupt-{suffix}")
    store = state.Store(db)
    try:
        owner = paths.home_id()
        known = providers.names()
        for p in providers_:
            if p not in known:
                out.notes.append(
                    f"{p}: cannot list what it holds: no such provider "
                    f"(known: {', '.join(known)}); not searched"
                )
                out.unsearched.append(p)
                continue
            try:
                found = _held(providers.get(p), regions, owner, out.notes)
            except (AuthError, UsageError) as e:  # no credentials, no region or project
                if named or (regions and not isinstance(e, AuthError)):
                    out.notes.append(f"{p}: not searched ({' '.join(str(e).split())})")
                    out.unsearched.append(p)
                else:
                    out.skipped.append(f"{p}: not searched: {' '.join(str(e).split())}")
                continue
            except Exception as e:  # one provider failing must not stop the others
                why = " ".join(str(e).split()) or type(e).__name__
                out.notes.append(f"{p}: not searched ({why})")
                out.unsearched.append(p)
                continue
            for rec in found:
                _record(store, rec, owner, out)
    finally:
        store.close()
    return out


@dataclass(frozen=True)
class _Found:
    provider: str
    uid: str
    name: str
    nodes: list  # providers.base.Node
    region: str | None = None
    request: ProvisionRequest | None = None  # what the provider keeps of the cluster's spec


def _held(p: Provider, regions: list[str], owner: str, notes: list[str]) -> list[_Found]:
    """This home's clusters among what the provider holds (`discover`), each with its nodes."""
    from mlcloud.provision import gc

    by_uid: dict[str, tuple[str, str]] = {}
    for r in gc.discover(p, regions):
        if r.owner != owner:
            if r.cluster_uid not in by_uid:
                notes.append(
                    f"{p.name}: cluster {r.cluster_name} ({r.cluster_uid}) belongs to "
                    "another home; left out"
                )
            by_uid.setdefault(r.cluster_uid, ("", ""))
            continue
        by_uid[r.cluster_uid] = (r.cluster_name, r.region)
    found = []
    for uid, (name, region) in by_uid.items():
        if name:
            ref = ClusterRef(name, uid, owner, region or None)
            found.append(_Found(p.name, uid, name, p.list(ref), ref.region, p.recorded(ref)))
    return found


def _record(store: state.Store, f: _Found, owner: str, out: Rebuild) -> None:
    from mlcloud.spec.task import SshSpec, TaskSpec, check_cluster_name

    try:
        check_cluster_name(f.name)
    except MlcloudError:
        out.notes.append(f"{f.provider}: {f.uid}: no cluster name in it; left out")
        return
    if f.uid in {c.uid for c in store.list_clusters()}:
        return
    if store.get_cluster(f.name) is not None:
        out.notes.append(
            f"{f.provider}: {f.uid}: the name {f.name} is taken by another cluster; "
            "left out (`mlcloud gc` lists it)"
        )
        return
    kept = f.request or ProvisionRequest(len(f.nodes))
    ssh = asdict(kept.ssh)
    ssh["allowed_cidrs"] = tuple(ssh["allowed_cidrs"])
    spec = TaskSpec(
        name=f.name,
        provider=f.provider,
        nodes=max(len(f.nodes), 1),
        region=f.region,
        hosts=kept.hosts,
        ssh=SshSpec(**ssh),
    ).to_dict()
    store.create_cluster(f.name, f.uid, f.provider, spec, owner)
    store.set_nodes(
        f.name,
        [
            state.NodeRecord(i, n.node_id, n.ip, n.private_ip, n.root, 0, None, n.status)
            for i, n in enumerate(f.nodes)
        ],
    )
    # with nodes: usable and `down`-able; without: only its cluster-wide leftovers, for `down`
    store.set_status(f.name, state.UP if f.nodes else state.STOPPING)
    store.event(f.name, "recovered", f"rebuilt by `mlcloud doctor --rebuild` from {f.provider}")
    out.clusters.append(Recovered(f.name, f.uid, f.provider, len(f.nodes), f.region))
