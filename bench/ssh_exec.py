"""Exec `true` on 8 real sshd nodes: mlcloud's SSH transport against 8 parallel OpenSSH `ssh`.

Run from the repository root with the project's venv:

    .venv/bin/python bench/ssh_exec.py [--runs N] [--nodes N] [--cli-runs N]

Starts N real OpenSSH ``sshd`` nodes on 127.0.0.2.. (tests/sshnodes.py) and measures, with the
cases interleaved round-robin (order rotated every round) so machine noise hits all alike:

  (a) cold   new SshTransport objects for every node, fan_out(run("true")): connect, key
             exchange, host-key check, auth and exec, all nodes in parallel;
  (b) warm   the same on transports that are already connected (one connection per node,
             reused, as mlcloud does for the whole of one command);
  baseline   N parallel OpenSSH `ssh host true` processes (Popen all, wait all);
  (c) info   `mlcloud exec NAME -- true` end to end (a whole CLI process) on an N-node ssh
             cluster; OpenSSH with the curve25519 key exchange paramiko uses (OpenSSH 9's
             default, sntrup761x25519, costs more CPU); OpenSSH over ControlMaster
             connections (OpenSSH's own "warm").

Prints median wall times and ratios to the baseline; exits 1 unless (a) and (b) are
<= 1.0x OpenSSH. The sshd nodes are stopped on every exit path (error, Ctrl-C, SIGTERM).
Standard library only, plus mlcloud and tests/sshnodes.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

TARGET = 1.0  # mlcloud / OpenSSH, cold and warm


def _sigterm(signum, frame):  # run the finally blocks (stop the nodes) on SIGTERM too
    raise SystemExit(128 + signum)


def ssh_parallel(argvs: list[list[str]]) -> None:
    procs = [
        subprocess.Popen(a, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL) for a in argvs
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"ssh exit codes {codes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed rounds (median)")
    parser.add_argument("--nodes", type=int, default=8, help="sshd nodes")
    parser.add_argument(
        "--cli-runs", type=int, default=None, help="rounds that also time `mlcloud exec` "
        "(default: every round; 0 skips the CLI case)"
    )  # fmt: skip
    opts = parser.parse_args()
    cli_runs = opts.runs if opts.cli_runs is None else opts.cli_runs
    signal.signal(signal.SIGTERM, _sigterm)

    with tempfile.TemporaryDirectory(prefix="mlcloud-bench-ssh-") as tmp:
        home = Path(tmp) / "home"
        os.environ["MLCLOUD_HOME"] = str(home)  # before mlcloud pins any host key
        os.environ.pop("MLCLOUD_DEBUG", None)
        from sshnodes import SshNodes

        from mlcloud.parallel import fan_out
        from mlcloud.remote.ssh import SshTarget, SshTransport

        with SshNodes(opts.nodes, Path(tmp) / "ssh") as nodes:
            n = opts.nodes
            key = str(nodes.client_key)
            targets = [
                SshTarget(host=x.host, port=x.port, user=x.user, identity_file=key)
                for x in nodes.nodes
            ]

            def transports() -> list[SshTransport]:
                return [SshTransport(t, label=f"node{i}") for i, t in enumerate(targets)]

            def run_true(t: SshTransport) -> None:
                r = t.run("true")
                if r.exit_code != 0:
                    raise RuntimeError(f"{t.label}: true exited {r.exit_code}: {r.stderr}")

            def close_all(ts: list[SshTransport]) -> None:
                for t in ts:
                    t.close()

            ssh_true = [nodes.ssh_argv(i, "true") for i in range(n)]
            ctl_dir = Path(tmp) / "ctl"
            ctl_dir.mkdir()
            mux = ["-o", f"ControlPath={ctl_dir}/%C"]
            mux_true = [a[:1] + mux + a[1:] for a in ssh_true]
            # OpenSSH 9.x negotiates sntrup761x25519 (post-quantum) by default, which costs
            # more CPU than the curve25519 that paramiko uses: shown for information.
            kex = ["-o", "KexAlgorithms=curve25519-sha256"]
            x25519_true = [a[:1] + kex + a[1:] for a in ssh_true]

            # Untimed warm-up: pins the host keys in mlcloud's known_hosts (as `up` does),
            # imports paramiko, fills the page cache for ssh and sshd.
            first = transports()
            fan_out(run_true, first)
            close_all(first)
            ssh_parallel(ssh_true)

            warm = transports()
            masters: list[subprocess.Popen] = []
            env = dict(os.environ, NO_COLOR="1")
            mlcloud_bin = str(Path(sys.executable).parent / "mlcloud")
            cluster = "bench-exec"
            cluster_up = False
            try:
                fan_out(run_true, warm)  # connect once; reused by every warm round
                for i in range(n):
                    argv = nodes.ssh_argv(i)
                    masters.append(
                        subprocess.Popen(
                            argv[:1] + mux + ["-M", "-N"] + argv[1:],
                            stdin=subprocess.DEVNULL,
                        )
                    )
                deadline = time.monotonic() + 10
                while len(list(ctl_dir.iterdir())) < n:
                    if time.monotonic() > deadline:
                        raise RuntimeError("OpenSSH ControlMaster sockets did not appear")
                    time.sleep(0.02)
                ssh_parallel(mux_true)

                if cli_runs:
                    hosts = ",".join(f"{x.user}@{x.host}:{x.port}" for x in nodes.nodes)
                    up = subprocess.run(
                        [mlcloud_bin, "up", cluster, "--provider", "ssh", "--hosts", hosts]
                        + ["--identity", key, "--yes"],
                        env=env, capture_output=True, text=True, timeout=300,
                    )  # fmt: skip
                    cluster_up = True
                    if up.returncode != 0:
                        raise RuntimeError(f"mlcloud up failed:\n{up.stdout}\n{up.stderr}")

                def cold_mlcloud() -> None:
                    ts = transports()
                    try:
                        fan_out(run_true, ts)
                    finally:
                        close_all(ts)

                def cli_exec() -> None:
                    p = subprocess.run(
                        [mlcloud_bin, "exec", cluster, "--", "true"],
                        env=env, capture_output=True, text=True, timeout=120,
                    )  # fmt: skip
                    if p.returncode != 0:
                        raise RuntimeError(f"mlcloud exec failed:\n{p.stdout}\n{p.stderr}")

                cases = {
                    "OpenSSH: ssh host true": lambda: ssh_parallel(ssh_true),
                    "(a) mlcloud cold": cold_mlcloud,
                    "(b) mlcloud warm": lambda: fan_out(run_true, warm),
                    "info: ssh, curve25519 kex": lambda: ssh_parallel(x25519_true),
                    "info: ssh over ControlMaster": lambda: ssh_parallel(mux_true),
                    "(c) mlcloud exec CLI": cli_exec,
                }
                if cli_runs:
                    cli_exec()  # untimed: bytecode and page cache
                times: dict[str, list[float]] = {c: [] for c in cases}
                names = list(cases)
                for r in range(opts.runs):
                    order = names[r % len(names) :] + names[: r % len(names)]
                    for name in order:
                        if name.startswith("(c)") and r >= cli_runs:
                            continue
                        t0 = time.perf_counter()
                        cases[name]()
                        times[name].append(time.perf_counter() - t0)
            finally:
                close_all(warm)
                for m in masters:
                    m.terminate()
                for m in masters:
                    try:
                        m.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        m.kill()
                        m.wait()
                if cluster_up:
                    subprocess.run(
                        [mlcloud_bin, "down", cluster, "--yes"],
                        env=env, capture_output=True, timeout=300,
                    )  # fmt: skip

    times = {k: v for k, v in times.items() if v}
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    base = med["OpenSSH: ssh host true"]
    width = max(len(k) for k in med)
    print(f"\nexec `true` on {n} sshd nodes in parallel ({opts.runs} rounds, round-robin)")
    print(f"{'case':<{width}}  {'median ms':>9}  {'min ms':>7}  {'max ms':>7}  {'vs ssh':>7}")
    for k in times:
        print(
            f"{k:<{width}}  {med[k]:9.1f}  {min(times[k]) * 1000:7.1f}  "
            f"{max(times[k]) * 1000:7.1f}  {med[k] / base:6.2f}x"
        )
    print(
        f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs; baseline: {n} parallel "
        f"OpenSSH processes, each a fresh connection)"
    )

    failures = []
    for k in ("(a) mlcloud cold", "(b) mlcloud warm"):
        ratio = med[k] / base
        verdict = "ok" if ratio <= TARGET else "MISSED"
        print(f"{k}: {ratio:.2f}x OpenSSH (target <= {TARGET:.1f}x) {verdict}")
        if ratio > TARGET:
            failures.append(f"{k} {ratio:.2f}x")
    if failures:
        print("\nFAIL: " + "; ".join(failures))
        return 1
    print("\nPASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
