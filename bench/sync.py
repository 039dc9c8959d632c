"""First sync through a shaped uplink: mlcloud to a whole cluster against rsync -az to one node.

Run as root from the repository root with the project's venv (needs iproute2, sshd, rsync):

    .venv/bin/python bench/sync.py [--uplink-mbit 20,50,200] [--nodes 4,8] [--runs 3]
                                   [--mb 24] [--files 800]

What the fan-out is for: a laptop or a CI runner reaches a cloud region through a link far
slower than the one between the nodes. So here the nodes are sshd hosts in network namespaces
on one bridge (tests/nsbridge.py), reaching each other unshaped, and the client (this process's
mlcloud code, and rsync) reaches the bridge through one veth pair whose client end shapes what
it sends with `tc qdisc ... tbf rate N mbit`: the client's uplink. Replies come back unshaped.

The workdir is built deterministically (random.Random(--seed)): half its bytes code-like text
(.py, .md, .yaml, .json, .csv; compressible), half random binary (.npy, .pt, .bin, .png), many
small files and a few large ones. For each uplink rate, round by round (the order of the
cases rotated each round, so machine noise hits all alike), it measures a first sync into
fresh node directories over fresh connections, as a new cluster's first `mlcloud train`:

  rsync -az to 1 node    the baseline: `rsync -az -e ssh src/ node0:dest/`
  mlcloud to N           mlcloud.remote.fanout.sync_nodes to N nodes (probe, install of the
                         relay, scan, pack, send to one node that passes it on)

and the bytes the client's end of the uplink sent in each (its veth's counter: SSH, TCP and
IP included). Every copy is checked against the source (file list, sizes, a sample of
hashes). Goal: mlcloud to the whole cluster in at most 0.8x the time of rsync to one node.

What it cannot show: the nodes share this machine's CPUs (every node's sshd, decryption and
writes), where real nodes each bring their own; at a fast uplink that CPU, not the link, is
what the cluster's sync waits for.

Prints the median times and their ratios; exits 1 if the goal is missed. The namespaces, the
links and the sshd processes are removed on every exit path (error, Ctrl-C, SIGTERM, SIGHUP).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
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

GOAL = 0.8
MANIFEST = ".mlcloud-manifest.json"  # mlcloud's own file in the synced directory

TEXT_KINDS = [(".py", 0.6), (".md", 0.1), (".yaml", 0.1), (".json", 0.1), (".csv", 0.1)]
BINARY_KINDS = [".npy", ".pt", ".bin", ".png"]


def _exit_on(signum, frame):  # unwind through the finally blocks: tear everything down
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


def make_workdir(root: Path, total_bytes: int, files: int, seed: int) -> float:
    """Build the workdir; returns the text's gzip -1 ratio."""
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
    return len(text_bytes) / len(zlib.compress(text_bytes, 1))


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
    """The nodes share this machine's filesystem, so a node's copy is checked in place."""
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


# ---- the shaped uplink -----------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Uplink:
    """The client's one way onto the nodes' bridge: a veth pair, the bridge's gateway address
    moved from the bridge to the client's end, whose egress (client to cluster) tbf shapes.
    The nodes' traffic among themselves stays on the bridge, unshaped."""

    def __init__(self, bridge) -> None:
        self.bridge = bridge
        self.dev, self.port = f"mbc{bridge.token}", f"mbp{bridge.token}"

    def __enter__(self) -> Uplink:
        try:
            _ip("link", "add", self.dev, "type", "veth", "peer", "name", self.port)
            _ip("link", "set", self.port, "master", self.bridge.bridge)
            _ip("link", "set", self.port, "up")
            _ip("addr", "del", f"{self.bridge.gateway}/24", "dev", self.bridge.bridge)
            _ip("addr", "add", f"{self.bridge.gateway}/24", "dev", self.dev)
            _ip("link", "set", self.dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.dev)  # its peer goes with it

    def shape(self, mbit: float) -> None:
        """tbf at mbit: a bucket of a few milliseconds' worth (at least 32 KiB, to pass a
        segment the kernel offloads whole), a queue of 100 ms, as an uplink's buffer."""
        burst = max(32 * 1024, int(mbit * 1e6 / 8 * 0.004))
        subprocess.run(
            ["tc", "qdisc", "replace", "dev", self.dev, "root", "tbf", "rate", f"{mbit}mbit",
             "burst", str(burst), "latency", "100ms"],
            check=True, capture_output=True, timeout=20,
        )  # fmt: skip

    def sent(self) -> int:
        """Bytes the client has sent over the uplink so far."""
        return int(Path(f"/sys/class/net/{self.dev}/statistics/tx_bytes").read_text())


# ---- the bench -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--uplink-mbit", default="20,50,200", help="the client's uplink rates, comma-separated"
    )
    parser.add_argument("--nodes", default="4,8", help="cluster sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="rounds (the median counts)")
    parser.add_argument("--mb", type=float, default=24, help="workdir size, MB (10^6 bytes)")
    parser.add_argument("--files", type=int, default=800, help="files in the workdir")
    parser.add_argument("--seed", type=int, default=0, help="workdir content seed")
    opts = parser.parse_args()
    rates = [float(x) for x in opts.uplink_mbit.split(",")]
    sizes = sorted({int(x) for x in opts.nodes.split(",")})
    import nsbridge

    if not nsbridge.available():
        print("needs root, iproute2 and sshd", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on)
    shm = Path("/dev/shm")
    # the nodes share this machine's one disk, which real nodes do not: tmpfs when it has room
    need = opts.mb * 1e6 * (max(sizes) + 3) * 1.2
    st = os.statvfs(shm) if shm.is_dir() else None
    where = str(shm) if st and st.f_bavail * st.f_frsize > need else None

    with tempfile.TemporaryDirectory(prefix="mlcloud-bench-sync-", dir=where) as tmp_name:
        tmp = Path(tmp_name)
        os.environ["MLCLOUD_HOME"] = str(tmp / "home")  # before mlcloud pins any host key
        os.environ.pop("MLCLOUD_DEBUG", None)
        from mlcloud.remote import fanout
        from mlcloud.remote.ssh import SshTarget, SshTransport

        src = tmp / "src"
        t0 = time.perf_counter()
        ratio = make_workdir(src, int(opts.mb * 1e6), opts.files, opts.seed)
        src_tree = tree(src)
        total = sum(src_tree.values())
        print(
            f"workdir: {len(src_tree)} files, {total / 1e6:.1f} MB (half text, gzip -1 "
            f"{ratio:.1f}x; half random), built in {time.perf_counter() - t0:.1f} s; in {tmp}"
        )
        rng = random.Random(opts.seed + 1)
        remote = tmp / "remote"  # the nodes' directories (one filesystem, one each)

        with nsbridge.NsBridge(max(sizes), tmp / "ns") as bridge, Uplink(bridge) as uplink:
            known = tmp / "known_hosts"
            known.write_text(
                "".join(
                    f"{h} {(bridge.workdir / f'node{i}' / 'host_ed25519.pub').read_text()}"
                    for i, h in enumerate(bridge.hosts)
                )
            )
            ssh = ["ssh", "-F", "/dev/null", "-i", str(bridge.client_key),
                   "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                   "-o", f"UserKnownHostsFile={known}",
                   "-o", "GlobalKnownHostsFile=/dev/null"]  # fmt: skip
            targets = [
                SshTarget(h, 22, "root", identity_file=str(bridge.client_key)) for h in bridge.hosts
            ]
            clusters = 0

            def mlcloud(dests: list[Path]) -> None:
                nonlocal clusters
                clusters += 1  # a cluster each: its own peer key
                ts = [
                    fanout.Target(SshTransport(targets[i], label=f"node{i}"), str(d))
                    for i, d in enumerate(dests)
                ]
                try:
                    fanout.sync_nodes(ts, src, f"bench-{clusters}", print)
                finally:
                    for t in ts:
                        t.transport.close()

            def rsync(dests: list[Path]) -> None:
                cmd = ["rsync", "-az", "-e", " ".join(ssh), f"{src}/"]
                dests[0].parent.mkdir(parents=True, exist_ok=True)  # rsync makes only the last
                cmd.append(f"root@{bridge.hosts[0]}:{dests[0]}/")
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if p.returncode != 0:
                    raise RuntimeError(f"rsync exited {p.returncode}: {p.stderr}")

            # Untimed: pin the nodes' host keys, import what mlcloud imports.
            uplink.shape(1000)
            mlcloud([remote / "warm" / f"node-{i}" for i in range(max(sizes))])
            shutil.rmtree(remote / "warm")

            cases = {"rsync": (rsync, 1)} | {f"mlcloud{n}": (mlcloud, n) for n in sizes}
            times = {(r, c): [] for r in rates for c in cases}
            sent = {(r, c): [] for r in rates for c in cases}
            for run in range(opts.runs):
                for rate in rates:
                    uplink.shape(rate)
                    names = list(cases)
                    order = names[run % len(names) :] + names[: run % len(names)]
                    for name in order:
                        fn, n = cases[name]
                        base = remote / f"r{run}-{rate:g}-{name}"
                        dests = [base / f"node-{i}" for i in range(n)]
                        b0, t0 = uplink.sent(), time.perf_counter()
                        fn(dests)
                        times[rate, name].append(time.perf_counter() - t0)
                        sent[rate, name].append(uplink.sent() - b0)
                        sample = rng.sample(sorted(src_tree), 12)
                        for d in dests:  # rsync writes into the directory, mlcloud its workdir/
                            verify(src, src_tree, d if name == "rsync" else d / "workdir", sample)
                        shutil.rmtree(base)
                    print(
                        f"round {run + 1}/{opts.runs}, {rate:g} Mbit/s: "
                        + ", ".join(f"{c} {times[rate, c][-1]:.2f} s" for c in cases),
                        flush=True,
                    )

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nfirst sync of {len(src_tree)} files / {total / 1e6:.0f} MB through a shaped uplink "
        f"(median of {opts.runs}): mlcloud to N nodes / rsync -az to 1 node"
    )
    heads = "  ".join(f"{'N=' + str(n):>14}" for n in sizes)
    print(f"{'uplink':>12}  {'rsync -az->1':>12}  {heads}")
    failures = []
    for rate in rates:
        cells = []
        for n in sizes:
            ratio = med[rate, f"mlcloud{n}"] / med[rate, "rsync"]
            cells.append(f"{ratio:5.2f}x {med[rate, f'mlcloud{n}']:6.2f}s")
            if ratio > GOAL:
                failures.append(f"{n} nodes at {rate:g} Mbit/s: {ratio:.2f}x")
        row = "  ".join(f"{c:>14}" for c in cells)
        print(f"{rate:>7g} Mbit  {med[rate, 'rsync']:11.2f}s  {row}")
    print("\nbytes over the uplink, median, / workdir size (its random half alone: 0.5):")
    for rate in rates:
        print(
            f"{rate:>7g} Mbit  "
            + "  ".join(f"{c} {statistics.median(sent[rate, c]) / total:.3f}" for c in cases)
        )
    cpus = os.cpu_count()
    print(f"(python {sys.version.split()[0]}, {cpus} CPUs shared by the client and the nodes)")
    if failures:
        print(f"\nFAIL (goal <= {GOAL}x): " + "; ".join(failures))
        return 1
    print(f"\nPASS (goal <= {GOAL}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
