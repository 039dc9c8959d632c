"""`mlcloud state import`: a home's SQLite state copied into the shared store, so a team
moving to PostgreSQL keeps its clusters, their jobs, billing and events, the ssh provider's
host claims and each cluster's keys (sealed with the team's secret).

Idempotent: a cluster incarnation (uid) the shared store already knows is left alone, so a
second run copies nothing; a live cluster whose name the store gives to another incarnation is
named as a conflict and not copied. Each incarnation is one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlcloud import state
from mlcloud.errors import UsageError

# the tables that belong to one incarnation, with the column that names it
_BY_UID = (("jobs", "uid"), ("billing", "uid"), ("events", "uid"), ("pulls", "uid"))


@dataclass
class Imported:
    source: str
    clusters: list[str] = field(default_factory=list)  # live clusters copied
    history: int = 0  # incarnations gone before the import whose jobs and billing came too
    skipped: list[str] = field(default_factory=list)  # already in the shared store
    conflicts: list[str] = field(default_factory=list)  # name taken by another incarnation


def import_home(home: Path) -> Imported:
    """Copy home/state.db (and the home's files the clusters need) into the shared store."""
    from mlcloud.state import files

    if not files.shared():
        raise UsageError(
            "state import copies this home's state into a shared store: set "
            "MLCLOUD_STATE_URL (or state_url: in config.yaml) first"
        )
    db = home / "state.db"
    out = Imported(str(db))
    if not db.is_file():
        return out
    source, target = state.Store(db), state.open_store()
    try:
        live = {c.uid: c for c in source.list_clusters()}
        uids = set(live) | {
            r[0]
            for table, column in _BY_UID
            for r in source._read(f"SELECT DISTINCT {column} FROM {table}")  # noqa: S608
            if r[0]
        }
        for uid in sorted(uids):
            rec = live.get(uid)
            if _known(target, uid):
                out.skipped.append(rec.name if rec else uid)
                continue
            if rec is not None:
                other = target.get_cluster(rec.name)
                if other is not None:
                    out.conflicts.append(f"{rec.name} (the store has {other.uid})")
                    continue
                _files(home, uid)  # before the row: a cluster in the store is reachable
            _copy(source, target, uid, rec)
            if rec is not None:
                out.clusters.append(rec.name)
            else:
                out.history += 1
    finally:
        source.close()
        target.close()
    return out


def _known(target: state.Store, uid: str) -> bool:
    return any(
        target._read(f"SELECT 1 FROM {table} WHERE {column}=? LIMIT 1", (uid,))  # noqa: S608
        for table, column in (("clusters", "uid"), *_BY_UID)
    )


def _copy(source: state.Store, target: state.Store, uid: str, rec) -> None:
    """One incarnation's rows, in one transaction (ids are the store's own)."""
    with target.tx() as db:
        if rec is not None:
            row = source._read("SELECT * FROM clusters WHERE uid=?", (uid,))[0]
            _insert(db, "clusters", row)
            for node in source._read("SELECT * FROM nodes WHERE cluster=?", (rec.name,)):
                _insert(db, "nodes", node)
        for table, column in _BY_UID:
            for row in source._read(f"SELECT * FROM {table} WHERE {column}=?", (uid,)):  # noqa: S608
                _insert(db, table, row)


def _insert(db, table: str, row) -> None:
    names = [k for k in row.keys() if k != "id"]
    quoted = ", ".join(f'"{n}"' for n in names)
    marks = ", ".join("?" for _ in names)
    db.execute(
        f"INSERT INTO {table} ({quoted}) VALUES ({marks})",  # noqa: S608
        tuple(row[n] for n in names),
    )


def _files(home: Path, uid: str) -> None:
    """The ssh provider's registry and the cluster's keys (sealed) from the home's files."""
    from mlcloud.state import files, sealed

    registry = home / "ssh" / f"{uid}.json"
    if registry.is_file():
        files.create(f"ssh/{uid}.json", registry.read_bytes())
    for name in (f"{uid}.ed25519", f"{uid}.peer.ed25519"):
        key = home / "keys" / name
        if key.is_file():
            rel = f"keys/{name}"
            files.create(rel, sealed.seal(rel, key.read_bytes(), files.salt()))
