"""CLI start-up latency: `mlcloud --help` and `mlcloud status --json` against `import boto3`.

The CLI must answer faster than Python can import the AWS SDK alone: the heavy SDKs (boto3,
google-cloud, paramiko, torch) load only in the commands that talk to a cloud or a node.

Run from the repository root with the project's venv:

    .venv/bin/python bench/cli_latency.py [--runs N] [--clusters N]

A temporary MLCLOUD_HOME is filled with clusters through the real state API, then every
command runs N times, interleaved round-robin (with the order rotated each round) so machine
noise hits all of them alike. Prints the median wall time of each, its ratio to the boto3
import, the heavy modules each CLI command imported, and PASS/FAIL (exit code 1 on FAIL).
Standard library only (plus mlcloud itself, to fill the state).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("boto3", "botocore", "google.cloud", "paramiko", "torch")

# Runs the CLI's main() in-process, then lists the heavy modules it left in sys.modules.
_PROBE = """\
import json, sys
heavy = json.loads(sys.argv[2])
sys.argv = ["mlcloud", *json.loads(sys.argv[1])]
from mlcloud.cli.app import main
try:
    main()
except SystemExit:
    pass
found = sorted(
    m for m in list(sys.modules) if any(m == h or m.startswith(h + ".") for h in heavy)
)
sys.stdout.flush()
sys.stderr.write("\\nMODULES=" + json.dumps(found) + "\\n")
"""


def fill_state(home: Path, clusters: int) -> None:
    from mlcloud.state import NodeRecord, Store

    store = Store(home / "state.db")
    for i in range(clusters):
        name = f"bench-{i:03d}"
        store.create_cluster(name, f"uid{i:06d}", "local", {}, "bench")
        nodes = [
            NodeRecord(idx, f"local-{idx}", "127.0.0.1", "127.0.0.1", "/tmp/x", 0, None, "running")
            for idx in range(2)
        ]
        store.set_nodes(name, nodes)
        store.set_status(name, "UP")
        for _ in range(1 + i % 2):  # one or two jobs per cluster
            store.new_job(name, "uid", "train.py", 2, 2, home)


def heavy_imports(python: str, args: list[str], env: dict[str, str]) -> list[str]:
    """The heavy modules that `mlcloud ARGS` imports (runs main() and lists sys.modules)."""
    proc = subprocess.run(
        [python, "-c", _PROBE, json.dumps(args), json.dumps(list(HEAVY))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    for line in reversed(proc.stderr.splitlines()):
        if line.startswith("MODULES="):
            return json.loads(line.removeprefix("MODULES="))
    raise RuntimeError(
        f"import probe for {args} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}"
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall time and CPU time (user + system) of one run of CMD."""
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    cpu = _children_cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed, cpu, proc


def check_json(proc: subprocess.CompletedProcess, clusters: int) -> None:
    data = json.loads(proc.stdout)
    got = len(data["clusters"])
    if got != clusters:
        raise RuntimeError(f"status --json listed {got} clusters, expected {clusters}")


def check_table(proc: subprocess.CompletedProcess, clusters: int) -> None:
    rows = sum(1 for line in proc.stdout.splitlines() if "bench-" in line)
    if rows != clusters:
        raise RuntimeError(f"status listed {rows} cluster rows, expected {clusters}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per command (median)")
    parser.add_argument("--clusters", type=int, default=200, help="clusters in the state")
    opts = parser.parse_args()

    python = sys.executable
    mlcloud = str(Path(sys.executable).parent / "mlcloud")
    if not Path(mlcloud).exists():
        print(f"no console script at {mlcloud}; run with the project's venv python")
        return 2

    with tempfile.TemporaryDirectory(prefix="mlcloud-bench-") as home:
        # Bytecode is cached (as for any installed tool) in a private prefix, so that neither
        # side pays for compiling sources: PYTHONDONTWRITEBYTECODE in the caller's environment
        # would otherwise recompile mlcloud's editable sources on every run but not boto3's.
        env = dict(os.environ, MLCLOUD_HOME=home, NO_COLOR="1")
        env["PYTHONPYCACHEPREFIX"] = str(Path(home) / "pycache")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.pop("MLCLOUD_DEBUG", None)
        t0 = time.perf_counter()
        fill_state(Path(home), opts.clusters)
        print(
            f"state: {opts.clusters} clusters in {home}/state.db "
            f"({(time.perf_counter() - t0) * 1000:.0f} ms to fill)"
        )

        commands: dict[str, tuple[list[str], object]] = {
            "mlcloud --help": ([mlcloud, "--help"], None),
            "mlcloud status --json": ([mlcloud, "status", "--json"], check_json),
            "mlcloud status": ([mlcloud, "status"], check_table),
            'python -c "import boto3"': ([python, "-c", "import boto3"], None),
        }
        names = list(commands)
        times: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}

        # One untimed round warms the page cache and the bytecode cache, and checks outputs.
        for name in names:
            cmd, check = commands[name]
            _, _, proc = timed(cmd, env)
            if check:
                check(proc, opts.clusters)

        for r in range(opts.runs):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                elapsed, used, _ = timed(commands[name][0], env)
                times[name].append(elapsed)
                cpu[name].append(used)

        probes = {
            "mlcloud --help": ["--help"],
            "mlcloud status --json": ["status", "--json"],
            "mlcloud status": ["status"],
        }
        heavy = {name: heavy_imports(python, args, env) for name, args in probes.items()}

    med = {n: statistics.median(t) * 1000 for n, t in times.items()}
    base = med['python -c "import boto3"']
    width = max(len(n) for n in names)
    cpu_med = {n: statistics.median(t) * 1000 for n, t in cpu.items()}
    cpu_base = cpu_med['python -c "import boto3"']
    print(
        f"\n{'command':<{width}}  {'median ms':>9}  {'min ms':>7}  {'vs boto3':>8}"
        f"  {'cpu ms':>7}  {'cpu vs boto3':>12}"
    )
    for n in names:
        print(
            f"{n:<{width}}  {med[n]:9.1f}  {min(times[n]) * 1000:7.1f}  {med[n] / base:7.2f}x"
            f"  {cpu_med[n]:7.1f}  {cpu_med[n] / cpu_base:11.2f}x"
        )
    print(
        f"({opts.runs} runs each, round-robin; wall time decides; cpu = user+sys of the child,"
        f" less sensitive to a busy machine; python {sys.version.split()[0]})"
    )

    print("\nheavy modules imported (" + ", ".join(HEAVY) + "):")
    for name, mods in heavy.items():
        shown = ", ".join(sorted({m.split(".")[0] for m in mods})) if mods else "none"
        extra = f" ({len(mods)} modules)" if mods else ""
        print(f"  {name:<{width}}  {shown}{extra}")

    failures = []
    for name in ("mlcloud --help", "mlcloud status --json"):
        if med[name] >= base:
            failures.append(f"{name} ({med[name]:.0f} ms) not faster than import boto3")
    for name, mods in heavy.items():
        if mods:
            failures.append(f"{name} imports heavy modules")
    if failures:
        print("\nFAIL: " + "; ".join(failures))
        return 1
    print(
        f"\nPASS: --help {med['mlcloud --help'] / base:.2f}x and status --json "
        f"{med['mlcloud status --json'] / base:.2f}x of import boto3; no heavy imports"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
