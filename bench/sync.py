"""Workdir sync to real sshd nodes: mlcloud's shipped-once fan-out against `rsync -az` over OpenSSH.

Run from the repository root with the project's venv:

    .venv/bin/python bench/sync.py [--runs N] [--nodes 4,8] [--mb 200] [--files 5000]

Builds a deterministic workdir (random.Random(--seed)): about half its bytes code-like text
(.py, .md, .yaml, .json, .csv; compressible) and half random binary (.npy, .pt, .bin, .png;
incompressible), many small files and a few large ones. Starts max(--nodes) real OpenSSH
``sshd`` nodes on 127.0.0.2.. (tests/sshnodes.py) and, for each cluster size N, measures
interleaved round-robin (order rotated every round) so machine noise hits all cases alike:

  first sync       into empty node directories, fresh connections (as a new cluster's first
                   `mlcloud train`: probe, install of the relay, scan/hash, pack, send, relay):
    rsync -az to 1 node            the baseline: `rsync -az -e ssh src/ node0:dest/`
    mlcloud to 1 node              mlcloud's own cost per node, for scale
    rsync -az to each of N         N rsyncs from the client, side by side
    mlcloud to N (fan-out)         mlcloud.remote.fanout.sync_nodes: the client sends to one
                                   node, which passes it on to the others over SSH
    mlcloud to N (direct)          the same sync with the fan-out off (the client sends to
                                   each node; --no-direct skips it)

and the bytes the client sent in each, against the workdir's size (mlcloud's counted on its
sockets, rsync's from `--stats`). Goal: mlcloud to the whole cluster at or below rsync to one.

  re-sync          one file changed each round, synced again into the synced copies (fresh
                   connections, as a new `mlcloud train` does): mlcloud to N against rsync
                   -az to one node; goal at or below it.

What this proves and what it cannot: the client's bytes are measured, so "the uplink carries
the workdir once, whatever N" holds as measured. Time cannot show the win a real cluster sees:
here the "private network" and the client's "uplink" are the same loopback, and every node's
sshd, decryption and writes share this machine's CPUs with the client, so the time to N nodes
grows with N for every method; on real machines each node brings its own CPU and disk, and the
client's link, not loopback, is what direct sends divide by N.

mlcloud caches a sync stream (and whatever else it keeps in mlcloud.remote.sync) per process;
the bench reloads that module before every timed case. Every first sync lands in new
directories, removed after they are checked against the source (file list, sizes, and the
content hash of a sample of files). "cpu s" is the CPU time the whole machine used.

The workdir and the nodes' directories live in /dev/shm when it has room (--tmp to choose):
the nodes share one disk here, which real nodes do not.

Prints median wall times, ratios to rsync to one node, and bytes; exits 1 if the goal is
missed. The sshd nodes are stopped on every exit path (error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

MANIFEST = ".mlcloud-manifest.json"  # mlcloud's own file in the synced directory

TEXT_KINDS = [(".py", 0.6), (".md", 0.1), (".yaml", 0.1), (".json", 0.1), (".csv", 0.1)]
BINARY_KINDS = [".npy", ".pt", ".bin", ".png"]


def _sigterm(signum, frame):  # run the finally blocks (stop the nodes) on SIGTERM too
    raise SystemExit(128 + signum)


# ---- the workdir -----------------------------------------------------------------------------


def _line_pool(rng: random.Random, count: int) -> list[bytes]:
    """Code-like lines: identifiers from a Zipf-weighted vocabulary, operators, a few numbers,
    indentation. Tuned to compress like real Python source (gzip -1 about 3x, -6 about 4x)."""
    letters = "abcdefghijklmnopqrstuvwxyz_"
    words = ["".join(rng.choices(letters, k=rng.randint(3, 12))) for _ in range(400)]
    weights = [1 / (i + 1) for i in range(len(words))]
    ops = [" = ", " + ", " - ", " * ", ", ", ".", "(", ")", "[", "]", " == ", ": "]
    heads = ("", "", "", "return ", "if ", "for x in ", "# ", "def ")
    lines = []
    for _ in range(count):
        parts = []
        for word in rng.choices(words, weights, k=rng.randint(1, 8)):
            parts.append(word if rng.random() > 0.08 else str(rng.randint(0, 999)))
            parts.append(rng.choice(ops))
        indent = "    " * rng.choice((0, 1, 1, 2, 2, 3))
        lines.append((indent + rng.choice(heads) + "".join(parts[:-1]) + "\n").encode())
    return lines


def _sizes(rng: random.Random, count: int, total: int, sigma: float) -> list[int]:
    """count sizes, log-normally spread (many small, a few large), summing to total."""
    weights = [rng.lognormvariate(0, sigma) for _ in range(count)]
    scale = total / sum(weights)
    sizes = [max(64, int(w * scale)) for w in weights]
    sizes[sizes.index(max(sizes))] += total - sum(sizes)
    return sizes


def make_workdir(root: Path, total_bytes: int, files: int, seed: int) -> dict:
    rng = random.Random(seed)
    n_bin = max(1, files * 3 // 20)  # 15% of the files hold half the bytes
    n_text = files - n_bin
    pool = _line_pool(rng, 20000)
    text_sizes = _sizes(rng, n_text, total_bytes // 2, 1.2)
    bin_sizes = _sizes(rng, n_bin, total_bytes - total_bytes // 2, 1.0)
    exts = [e for e, _ in TEXT_KINDS]
    weights = [w for _, w in TEXT_KINDS]
    text_paths = []
    for i, size in enumerate(text_sizes):
        ext = rng.choices(exts, weights)[0]
        sub = "src" if ext == ".py" else rng.choice(("docs", "configs", "data/meta"))
        rel = f"{sub}/pkg_{i % 40:02d}/file_{i:04d}{ext}"
        chunks, have = [], 0
        while have < size:
            chunk = b"".join(rng.choices(pool, k=64))
            chunks.append(chunk)
            have += len(chunk)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(chunks)[:size])
        text_paths.append(rel)
    for i, size in enumerate(bin_sizes):
        ext = BINARY_KINDS[i % len(BINARY_KINDS)]
        path = root / f"assets/shard_{i // 50:02d}/blob_{i:04d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    text_bytes = b"".join((root / p).read_bytes() for p in text_paths[:200])
    ratio = len(text_bytes) / len(zlib.compress(text_bytes, 1))
    return {"text_paths": text_paths, "text_gzip1_ratio": ratio, "files": files}


def tree(root: Path) -> dict[str, int]:
    """relative path -> size, mlcloud's manifest left out."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel != MANIFEST:
                out[rel] = path.stat().st_size
    return out


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(src: Path, src_tree: dict[str, int], dest: Path, sample: list[str]) -> None:
    """The nodes share this machine's filesystem, so the remote tree is checked in place."""
    got = tree(dest)
    if got != src_tree:
        missing = sorted(set(src_tree) - set(got))[:3]
        extra = sorted(set(got) - set(src_tree))[:3]
        wrong = sorted(p for p in set(got) & set(src_tree) if got[p] != src_tree[p])[:3]
        raise RuntimeError(
            f"{dest}: {len(got)} files, source {len(src_tree)}; missing {missing}, "
            f"extra {extra}, size differs {wrong}"
        )
    for rel in sample:
        if _hash(src / rel) != _hash(dest / rel):
            raise RuntimeError(f"{dest}/{rel}: content differs from the source")


def machine_cpu() -> float:
    """CPU seconds used by the whole machine so far (user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")


def default_tmp(need: float) -> str | None:
    """/dev/shm if it can hold everything: the N nodes share this machine's one disk, and its
    writeback of every node's copy (plus discards after each round) would otherwise add noise
    that a real node with its own disk does not have."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize > need else None


# ---- the bench -------------------------------------------------------------------------------


class Counter:
    """Bytes this process sends on the sockets it opens from now on (mlcloud's SSH links)."""

    def __init__(self) -> None:
        import socket

        self.sent = 0
        real = socket.create_connection
        counter = self

        class Counting:
            def __init__(self, sock):
                self._sock = sock

            def send(self, data):
                n = self._sock.send(data)
                counter.sent += n
                return n

            def sendall(self, data):
                counter.sent += len(data)
                return self._sock.sendall(data)

            def __getattr__(self, name):
                return getattr(self._sock, name)

        socket.create_connection = lambda *a, **k: Counting(real(*a, **k))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--nodes", default="4,8", help="cluster sizes, comma-separated")
    parser.add_argument("--mb", type=float, default=200, help="workdir size, MB (10^6 bytes)")
    parser.add_argument("--files", type=int, default=5000, help="files in the workdir")
    parser.add_argument("--seed", type=int, default=0, help="workdir content seed")
    parser.add_argument(
        "--no-direct",
        dest="direct",
        action="store_false",
        help="skip mlcloud's sync with the fan-out off",
    )
    parser.add_argument(
        "--tmp",
        help="where the workdir and the nodes' directories go (default: /dev/shm when it has "
        "room, else the system temp dir)",
    )
    opts = parser.parse_args()
    sizes = sorted({int(x) for x in opts.nodes.split(",")})
    signal.signal(signal.SIGTERM, _sigterm)
    most = max(sizes)
    where = opts.tmp or default_tmp(opts.mb * 1e6 * (2 * most + 3) * 1.2)

    with tempfile.TemporaryDirectory(prefix="mlcloud-bench-sync-", dir=where) as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MLCLOUD_HOME"] = str(tmp / "home")  # before mlcloud pins any host key
        os.environ.pop("MLCLOUD_DEBUG", None)
        from sshnodes import SshNodes

        from mlcloud.remote import fanout
        from mlcloud.remote import sync as mlsync
        from mlcloud.remote.ssh import SshTarget, SshTransport

        counter = Counter()
        src = tmp / "src"
        t0 = time.perf_counter()
        info = make_workdir(src, int(opts.mb * 1e6), opts.files, opts.seed)
        src_tree = tree(src)
        total = sum(src_tree.values())
        print(
            f"workdir: {len(src_tree)} files, {total / 1e6:.1f} MB (half text, gzip -1 "
            f"ratio {info['text_gzip1_ratio']:.1f}x; half random binary), built in "
            f"{time.perf_counter() - t0:.1f} s; in {tmp}"
        )
        rng = random.Random(opts.seed + 1)
        remote = tmp / "remote"  # what the nodes write to (same filesystem, own directories)

        with SshNodes(most, tmp / "ssh") as nodes:
            key = str(nodes.client_key)
            targets = [
                SshTarget(host=x.host, port=x.port, user=x.user, identity_file=key)
                for x in nodes.nodes
            ]
            rsync_e = shlex.join(["ssh", *nodes.ssh_options()])

            def mlcloud_sync(roots: list[Path], relay: bool) -> None:
                ts = [
                    fanout.Target(SshTransport(targets[i], label=f"node{i}"), str(roots[i]))
                    for i in range(len(roots))
                ]
                try:
                    # a cluster each: one peer key, its nodes in one directory
                    uid = f"bench-{roots[0].parent.parent.name}-{roots[0].parent.name}"
                    above = fanout.RELAY_ABOVE if relay else 1 << 62  # as `train` does, or never
                    fanout.sync_nodes(ts, src, uid, print, relay_above=above)
                finally:
                    for t in ts:
                        t.transport.close()

            def rsync(i: int, dest: Path) -> int:
                """rsync to node i; the bytes it sent."""
                node = nodes.nodes[i]
                dest.parent.mkdir(parents=True, exist_ok=True)  # rsync makes only the last
                cmd = ["rsync", "-az", "--stats", "-e", rsync_e, f"{src}/"]
                cmd.append(f"{node.user}@{node.host}:{dest}/")
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if p.returncode != 0:
                    raise RuntimeError(f"rsync exited {p.returncode}: {p.stderr}")
                for line in p.stdout.splitlines():
                    if line.startswith("Total bytes sent:"):
                        return int(line.split(":")[1].replace(",", ""))
                return 0

            def rsync_each(dests: list[Path]) -> int:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(dests)) as pool:
                    return sum(pool.map(rsync, range(len(dests)), dests))

            # Untimed: pin host keys, import paramiko.
            warm = [remote / "warm" / f"node-{i}" for i in range(most)]
            mlcloud_sync(warm, relay=True)
            shutil.rmtree(remote / "warm")

            results: dict[int, dict[str, tuple[str, list[float], list[float], list[int]]]] = {}
            for n in sizes:
                keys = {
                    "rs1": "rsync -az to 1 node",
                    "one": "mlcloud to 1 node",
                    "rsn": f"rsync -az to each of {n}",
                    "fan": f"mlcloud to {n} (fan-out)",
                    "dir": f"mlcloud to {n} (direct)",
                    "rsr": "re-sync, rsync -az to 1 node",
                    "rer": f"re-sync, mlcloud to {n}",
                }
                names = ["rs1", "one", "rsn", "fan"] + (["dir"] if opts.direct else [])
                names += ["rsr", "rer"]
                # Untimed: the re-sync cases start from synced copies; each round changes one
                # file (new content, size and mtime) and syncs again (fresh connections).
                re_rs = remote / f"n{n}-resync" / "rs" / "node-0"
                re_ml = [remote / f"n{n}-resync" / "ml" / f"node-{i}" for i in range(n)]
                rsync(0, re_rs)
                mlcloud_sync(re_ml, relay=True)
                times: dict[str, list[float]] = {k: [] for k in names}
                cpu: dict[str, list[float]] = {k: [] for k in names}
                bytes_: dict[str, list[int]] = {k: [] for k in names}
                for r in range(opts.runs):
                    changed = rng.choice(info["text_paths"])
                    with (src / changed).open("ab") as f:
                        f.write(f"# changed in round {r} of N={n}\n".encode())
                    src_tree = tree(src)
                    base = remote / f"n{n}-r{r}"
                    cases = {
                        "rs1": (lambda d: rsync(0, d[0]), [base / "rs1" / "node-0"]),
                        "one": (lambda d: mlcloud_sync(d, relay=False), [base / "one" / "node-0"]),
                        "rsn": (rsync_each, [base / "rsn" / f"node-{i}" for i in range(n)]),
                        "fan": (
                            lambda d: mlcloud_sync(d, relay=True),
                            [base / "fan" / f"node-{i}" for i in range(n)],
                        ),
                        "dir": (
                            lambda d: mlcloud_sync(d, relay=False),
                            [base / "dir" / f"node-{i}" for i in range(n)],
                        ),
                        "rsr": (lambda d: rsync(0, d[0]), [re_rs]),
                        "rer": (lambda d: mlcloud_sync(d, relay=True), re_ml),
                    }
                    order = names[r % len(names) :] + names[: r % len(names)]
                    for name in order:
                        fn, dests = cases[name]
                        importlib.reload(mlsync)
                        importlib.reload(fanout)
                        counter.sent = 0
                        c0, t0 = machine_cpu(), time.perf_counter()
                        got = fn(dests)
                        times[name].append(time.perf_counter() - t0)
                        cpu[name].append(machine_cpu() - c0)
                        bytes_[name].append(got if name.startswith("rs") else counter.sent)
                        for d in dests:
                            # rsync writes into the directory, mlcloud into its workdir/
                            verify(
                                src,
                                src_tree,
                                d if name.startswith("rs") else d / "workdir",
                                [*rng.sample(sorted(src_tree), 12), changed],
                            )
                        if not name.startswith("re") and name != "rsr":
                            shutil.rmtree(base / name)
                    print(
                        f"N={n} round {r + 1}/{opts.runs}: "
                        + ", ".join(f"{keys[k]} {times[k][-1]:.2f}s" for k in names),
                        flush=True,
                    )
                results[n] = {k: (keys[k], times[k], cpu[k], bytes_[k]) for k in names}

    print(
        f"\nsync of {len(src_tree)} files / {total / 1e6:.0f} MB over real sshd "
        f"({opts.runs} rounds, round-robin)"
    )
    width = max(len(row[0]) for rows in results.values() for row in rows.values())
    print(
        f"{'case':<{width}}  {'median s':>8}  {'min s':>6}  {'max s':>6}  {'vs rsync->1':>11}"
        f"  {'cpu s':>6}  {'client sent':>11}"
    )
    failures = []
    for n, rows in results.items():
        for key, (label, times, cpu, sent) in rows.items():
            base = statistics.median(rows["rsr" if key in ("rsr", "rer") else "rs1"][1])
            med = statistics.median(times)
            print(
                f"{label:<{width}}  {med:8.2f}  {min(times):6.2f}  {max(times):6.2f}  "
                f"{med / base:10.2f}x  {statistics.median(cpu):6.2f}  "
                f"{statistics.median(sent) / total:10.2f}x"
            )
        ratio = statistics.median(rows["fan"][1]) / statistics.median(rows["rs1"][1])
        verdict = "ok" if ratio <= 1.0 else "MISSED"
        print(f"N={n}: mlcloud to {n} nodes {ratio:.2f}x rsync to 1 (goal <= 1.0x) {verdict}")
        if ratio > 1.0:
            failures.append(f"N={n} {ratio:.2f}x")
        ratio = statistics.median(rows["rer"][1]) / statistics.median(rows["rsr"][1])
        verdict = "ok" if ratio <= 1.0 else "MISSED"
        print(f"N={n}: re-sync, mlcloud to {n} {ratio:.2f}x rsync to 1 (goal <= 1.0x) {verdict}\n")
        if ratio > 1.0:
            failures.append(f"N={n} re-sync {ratio:.2f}x")
    print(
        f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs; cpu s = CPU time of the whole"
        " machine during the case; client sent = bytes the client sent / workdir size)"
    )
    if failures:
        print("\nFAIL: " + "; ".join(failures))
        return 1
    print("\nPASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
