"""Workdir sync to real sshd nodes: mlcloud's delta sync against `rsync -az` over OpenSSH.

Run from the repository root with the project's venv:

    .venv/bin/python bench/sync.py [--runs N] [--nodes N] [--mb 100] [--files 2000]

Builds a deterministic workdir (random.Random(--seed)): about half its bytes code-like text
(.py, .md, .yaml, .json, .csv; compressible) and half random binary (.npy, .pt, .bin, .png;
incompressible), many small files and a few large ones. Starts N real OpenSSH ``sshd`` nodes
on 127.0.0.2.. (tests/sshnodes.py) and measures, interleaved round-robin (order rotated every
round) so machine noise hits all cases alike:

  (a) first sync   fresh SshTransports, fan_out(transport.sync) into empty directories on
                   all N nodes (connect + manifest + scan/hash + pack + send + extract),
                   against `rsync -az -e ssh src/ node0:dest/` to ONE node; target <= 1.5x;
  (b) re-sync      one file changed, then the same again into the synced directories (fresh
                   transports, as a new `mlcloud train` does) against `rsync -az` of the same
                   tree into its synced copy on one node; target <= 1.0x.

  info             a first sync by mlcloud to ONE node (--no-single skips it): mlcloud's cost
                   per node, since here the N nodes share this machine's CPUs with the client.

mlcloud caches a sync stream (and whatever else it keeps in mlcloud.remote.sync) per process;
the bench reloads that module before every timed case, so each mlcloud sync is timed as a new
process would run it. Every first sync lands in a new directory, removed after it is checked.
After every sync the remote trees are checked against the source (file list, sizes, and the
content hash of a sample of files plus the changed one). The "cpu s" column is the CPU time
the whole machine used during the case (client, sshd, receivers).

The workdir and the nodes' directories live in /dev/shm when it has room (--tmp to choose):
the nodes share one disk here, which real nodes do not.

Prints median wall times and ratios; exits 1 if a target is missed. The sshd nodes are stopped
on every exit path (error, Ctrl-C, SIGTERM). Standard library only, plus mlcloud and
tests/sshnodes.py.
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

FIRST_TARGET = 1.5  # mlcloud to N nodes / rsync to one node
RESYNC_TARGET = 1.0
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--nodes", type=int, default=4, help="sshd nodes mlcloud syncs to")
    parser.add_argument("--mb", type=float, default=100, help="workdir size, MB (10^6 bytes)")
    parser.add_argument("--files", type=int, default=2000, help="files in the workdir")
    parser.add_argument("--seed", type=int, default=0, help="workdir content seed")
    parser.add_argument(
        "--no-single",
        dest="single",
        action="store_false",
        help="skip the info case: a first sync by mlcloud to one node",
    )
    parser.add_argument(
        "--tmp",
        help="where the workdir and the nodes' directories go (default: /dev/shm when it has "
        "room, else the system temp dir)",
    )
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    where = opts.tmp or default_tmp(opts.mb * 1e6 * (opts.nodes + 3) * 1.2)

    with tempfile.TemporaryDirectory(prefix="mlcloud-bench-sync-", dir=where) as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MLCLOUD_HOME"] = str(tmp / "home")  # before mlcloud pins any host key
        os.environ.pop("MLCLOUD_DEBUG", None)
        from sshnodes import SshNodes

        from mlcloud.parallel import fan_out
        from mlcloud.remote import sync as mlsync
        from mlcloud.remote.ssh import SshTarget, SshTransport

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

        with SshNodes(opts.nodes, tmp / "ssh") as nodes:
            n = opts.nodes
            key = str(nodes.client_key)
            targets = [
                SshTarget(host=x.host, port=x.port, user=x.user, identity_file=key)
                for x in nodes.nodes
            ]
            node0 = nodes.nodes[0]
            rsync_e = shlex.join(["ssh", *nodes.ssh_options()])

            def mlcloud_sync(dests: list[Path]) -> None:
                ts = [SshTransport(targets[i], label=f"node{i}") for i in range(len(dests))]
                try:
                    fan_out(lambda i: ts[i].sync(src, str(dests[i])), list(range(len(dests))))
                finally:
                    for t in ts:
                        t.close()

            def rsync(dest: Path) -> None:
                dest.parent.mkdir(parents=True, exist_ok=True)  # rsync makes only the last
                cmd = [
                    "rsync",
                    "-az",
                    "-e",
                    rsync_e,
                    f"{src}/",
                    f"{node0.user}@{node0.host}:{dest}/",
                ]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if p.returncode != 0:
                    raise RuntimeError(f"rsync exited {p.returncode}: {p.stderr}")

            def sample(extra: list[str]) -> list[str]:
                return rng.sample(sorted(src_tree), 12) + extra

            # Untimed: pin host keys, import paramiko, and sync the re-sync targets once.
            re_ml = [remote / f"n{i}" / "resync" for i in range(n)]
            re_rs = remote / "rsync" / "resync"
            mlcloud_sync(re_ml)
            rsync(re_rs)
            for d in [*re_ml, re_rs]:
                verify(src, src_tree, d, sample([]))

            first_rs_k, first_ml_k = (
                "(a) first sync, rsync -az to 1 node",
                f"(a) first sync, mlcloud to {n} nodes",
            )
            re_rs_k, re_ml_k = (
                "(b) re-sync, rsync -az to 1 node",
                f"(b) re-sync, mlcloud to {n} nodes",
            )
            one_k = "info: first sync, mlcloud to 1 node"
            names = [first_rs_k, first_ml_k, re_rs_k, re_ml_k] + ([one_k] if opts.single else [])
            short = {
                first_rs_k: "first rsync",
                first_ml_k: "first mlcloud",
                re_rs_k: "re rsync",
                re_ml_k: "re mlcloud",
                one_k: "first mlcloud 1 node",
            }
            times: dict[str, list[float]] = {k: [] for k in names}
            cpu: dict[str, list[float]] = {k: [] for k in names}
            for r in range(opts.runs):
                # One changed file per round: new content, new size, new mtime.
                changed = rng.choice(info["text_paths"])
                with (src / changed).open("ab") as f:
                    f.write(f"# changed in round {r}\n".encode())
                src_tree = tree(src)
                first_ml = [remote / f"n{i}" / f"first-{r}" for i in range(n)]
                first_rs = remote / "rsync" / f"first-{r}"
                one = remote / "one" / f"first-{r}"
                cases = {
                    first_rs_k: (rsync, first_rs, [first_rs]),
                    first_ml_k: (mlcloud_sync, first_ml, first_ml),
                    re_rs_k: (rsync, re_rs, [re_rs]),
                    re_ml_k: (mlcloud_sync, re_ml, re_ml),
                    one_k: (mlcloud_sync, [one], [one]),
                }
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    fn, arg, dests = cases[name]
                    # Time each mlcloud sync as a new process runs it: no stream or scan that
                    # an earlier call cached in mlcloud.remote.sync's module state.
                    importlib.reload(mlsync)
                    c0, t0 = machine_cpu(), time.perf_counter()
                    fn(arg)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(machine_cpu() - c0)
                    for d in dests:
                        verify(src, src_tree, d, sample([changed]))
                for d in [*first_ml, first_rs, one]:
                    shutil.rmtree(d, ignore_errors=True)  # every first sync is really first
                print(
                    f"round {r + 1}/{opts.runs}: "
                    + ", ".join(f"{short[k]} {times[k][-1]:.2f}s" for k in names),
                    flush=True,
                )

    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    width = max(len(k) for k in med)
    print(
        f"\nsync of {len(src_tree)} files / {total / 1e6:.0f} MB over real sshd "
        f"({opts.runs} rounds, round-robin)"
    )
    print(
        f"{'case':<{width}}  {'median s':>8}  {'min s':>6}  {'max s':>6}  {'vs rsync':>8}"
        f"  {'cpu s':>6}"
    )
    for k in names:
        base = med[re_rs_k] if k.startswith("(b)") else med[first_rs_k]
        print(
            f"{k:<{width}}  {med[k]:8.2f}  {min(times[k]):6.2f}  {max(times[k]):6.2f}  "
            f"{med[k] / base:7.2f}x  {cpu_med[k]:6.2f}"
        )
    print(
        f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs; cpu s = CPU time of the whole"
        " machine during the case: client, sshd and receivers; the nodes share these CPUs)"
    )

    failures = []
    for k, base, target in (
        (first_ml_k, first_rs_k, FIRST_TARGET),
        (re_ml_k, re_rs_k, RESYNC_TARGET),
    ):
        ratio = med[k] / med[base]
        verdict = "ok" if ratio <= target else "MISSED"
        print(f"{k}: {ratio:.2f}x rsync (target <= {target:.1f}x) {verdict}")
        if ratio > target:
            failures.append(f"{k} {ratio:.2f}x")
    if failures:
        print("\nFAIL: " + "; ".join(failures))
        return 1
    print("\nPASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
