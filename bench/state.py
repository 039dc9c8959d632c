"""State on PostgreSQL against SQLite, in one run on this machine.

    .venv/bin/python bench/state.py [--clusters 10000] [--runs 5] [--readers 50]

Starts a PostgreSQL server of its own (tests/pgserver.py: initdb in a temporary directory,
statements logged so each command's queries can be counted) and fills both stores with the
same clusters (2 nodes each, one finished job, an open billing interval). Then:

- `status --json` on each store, and `python -c "import boto3"` as the yardstick (median wall
  of N interleaved runs); goal: PostgreSQL within 1.5x SQLite;
- 50 concurrent `status --json` on PostgreSQL: p50 and p99 of their wall times, and whether
  any was refused (goal: none);
- `up` (and `down`) of a 1-node local cluster on each store;
- statements each command's own process sends to PostgreSQL (`status`, `cancel` of a running
  job, `train --detach` up to its start), from the server's statement log; goal: at most 5 for
  status and cancel.

Prints a table and PASS/FAIL per goal; exit 1 if a goal was missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MLCLOUD = str(Path(sys.executable).parent / "mlcloud")


def fill(store, clusters: int) -> None:
    """The same rows on either store, in a handful of transactions."""
    import json

    now = time.time()
    rows, nodes, jobs, billing = [], [], [], []
    for i in range(clusters):
        name, uid = f"bench-{i:05d}", f"bench-{i:05d}-{i:08x}"
        rows.append((name, uid, "local", "UP", json.dumps({"nodes": 2}), "o", now, now, 2, "b@h"))
        for k in range(2):
            nodes.append(
                (name, k, f"local-{k}", "127.0.0.1", "127.0.0.1", "/x", 0, None, "running", "")
            )
        jobs.append((name, uid, 1, "SUCCEEDED", "t.py", 2, 1, now, now, 0, "/l", None))
        billing.append((name, uid, "local", "local-0", "local", "local", 0.0, now))
    with store.tx() as db:
        db.executemany("INSERT INTO clusters VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("INSERT INTO nodes VALUES (?,?,?,?,?,?,?,?,?,?)", nodes)
        db.executemany("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", jobs)
        db.executemany(
            "INSERT INTO billing (cluster, uid, provider, node_id, instance_type, region, price, "
            'start, "end") VALUES (?,?,?,?,?,?,?,?,NULL)',
            billing,
        )


def wall(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.strip()[-500:]}")
    return took


def statements(server, env: dict, argv: list[str]) -> int:
    """How many statements (round trips) the command's own process sent: the lines the server
    logged under its connections' names (`mlcloud PID`, a lock's `mlcloud TIME PID WHO`), so a
    detached driver's are not counted."""
    log = server.dir / "server.log"
    before = log.stat().st_size
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(600)
    time.sleep(0.3)  # the log is written by the server, a moment later
    with open(log, "rb") as f:
        f.seek(before)
        text = f.read().decode(errors="replace")
    count = 0
    for line in text.splitlines():
        head, _, rest = line.partition(" LOG:  ")
        words = head.split()
        mine = words[:1] == ["mlcloud"] and str(proc.pid) in words[1:3]
        count += mine and rest.startswith(("statement:", "execute"))
    return count


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--readers", type=int, default=50)
    args = ap.parse_args()

    from pgserver import PgServer

    from mlcloud import state
    from mlcloud.state import pg as pgstore

    server = PgServer()
    tmp = Path(tempfile.mkdtemp(prefix="mlcloud-bench-state-"))
    try:
        url = server.database()
        import psycopg

        with psycopg.connect(server.url("postgres"), autocommit=True) as c:
            c.execute("ALTER SYSTEM SET log_statement = 'all'")
            c.execute("ALTER SYSTEM SET log_line_prefix = '%a '")
            c.execute("SELECT pg_reload_conf()")
        base = {k: v for k, v in os.environ.items() if not k.startswith("MLCLOUD_")}
        base["NO_COLOR"] = "1"
        lite = {**base, "MLCLOUD_HOME": str(tmp / "sqlite")}
        pg = {**base, "MLCLOUD_HOME": str(tmp / "pg"), "MLCLOUD_STATE_URL": url}
        pg["MLCLOUD_STATE_KEY"] = "bench-secret"
        (tmp / "sqlite").mkdir()
        fill(state.Store(tmp / "sqlite" / "state.db"), args.clusters)
        fill(pgstore.PgStore(url), args.clusters)

        times: dict[str, list[float]] = {"sqlite": [], "postgresql": [], "boto3": []}
        runs = {
            "sqlite": ([MLCLOUD, "status", "--json"], lite),
            "postgresql": ([MLCLOUD, "status", "--json"], pg),
            "boto3": ([sys.executable, "-c", "import boto3"], base),
        }
        for r in range(args.runs):
            order = list(runs)
            order = order[r % 3 :] + order[: r % 3]
            for name in order:
                times[name].append(wall(*runs[name]))
        med = {k: statistics.median(v) for k, v in times.items()}

        def reader(_):
            started = time.perf_counter()
            r = subprocess.run(runs["postgresql"][0], env=pg, capture_output=True, timeout=600)
            return time.perf_counter() - started, r.returncode

        with ThreadPoolExecutor(args.readers) as pool:
            done = list(pool.map(reader, range(args.readers)))
        readers = sorted(t for t, _ in done)
        refused = sum(1 for _, code in done if code != 0)
        p50 = statistics.median(readers)
        p99 = readers[min(len(readers) - 1, round(0.99 * (len(readers) - 1)))]

        up = {}
        for name, env in (("sqlite", lite), ("postgresql", pg)):
            up[name] = wall([MLCLOUD, "up", "bench-up", "--nodes", "1", "--yes"], env)
            wall([MLCLOUD, "down", "bench-up", "--yes"], env)

        n_status = statements(server, pg, [MLCLOUD, "status", "--json"])
        project = tmp / "proj"
        project.mkdir()
        (project / "t.py").write_text("import time\ntime.sleep(600)\n")
        wall([MLCLOUD, "up", "bench-train", "--nodes", "1", "--yes"], pg)
        train = [MLCLOUD, "train", "bench-train", "-w", str(project), "--detach", "t.py"]
        n_train = statements(server, pg, train)
        n_cancel = statements(server, pg, [MLCLOUD, "cancel", "bench-train"])
        wall([MLCLOUD, "down", "bench-train", "--yes"], pg)
    finally:
        server.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    ratio = med["postgresql"] / med["sqlite"]
    print(f"state bench: {args.clusters} clusters, median of {args.runs} runs, this machine")
    print(f"{'':34} {'seconds':>8} {'x sqlite':>9} {'x boto3':>8}")
    for name in ("sqlite", "postgresql", "boto3"):
        label = {"boto3": 'python -c "import boto3"'}.get(name, f"status --json on {name}")
        print(
            f"{label:34} {med[name]:8.3f} {med[name] / med['sqlite']:9.2f} "
            f"{med[name] / med['boto3']:8.2f}"
        )
    print(
        f"{args.readers} concurrent status (postgresql): p50 {p50:.3f}s p99 {p99:.3f}s, "
        f"refused {refused}"
    )
    print(
        f"up of a 1-node local cluster: sqlite {up['sqlite']:.3f}s, postgresql "
        f"{up['postgresql']:.3f}s ({up['postgresql'] / up['sqlite']:.2f}x)"
    )
    print(
        f"statements on postgresql: status {n_status}, cancel {n_cancel}, train --detach {n_train}"
    )
    goals = [
        ("postgresql status within 1.5x sqlite", ratio <= 1.5),
        ("status at most 5 statements", n_status <= 5),
        ("cancel at most 5 statements", n_cancel <= 5),
        ("no concurrent reader refused", refused == 0),
    ]
    for what, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
