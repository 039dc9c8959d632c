"""The node agent's CPU cost on a node, as a percentage of one core (target: under 1%).

Run from the repository root with the project's venv:

    .venv/bin/python bench/agent_overhead.py [--seconds S] [--poll S]

Sets up a node directory as bootstrap leaves it (node_ctl.py, agent.py, config.json) with a
running job (a tagged process, its waiter, a log that grows and the template's
progress.json), starts the real agent there, and measures the CPU time it and its children
(nvidia-smi, where the machine has one) use over S seconds from /proc/<pid>/stat. Baseline,
from the same run and window: a Python process that only wakes at the same poll interval.
Prints both and exits 1 if the agent costs 1% of a core or more. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 1.0  # percent of one core
TAG = "bench-agent.0."


def cpu_seconds(pid: int) -> float:
    """CPU time of the process (schedstat: nanoseconds, where stat counts 10 ms ticks) and of
    its waited-for children (nvidia-smi: stat's cutime + cstime)."""
    with open(f"/proc/{pid}/schedstat") as f:
        own = int(f.read().split()[0]) / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return own + sum(int(x) for x in fields[13:15]) / os.sysconf("SC_CLK_TCK")


def node(base: Path, poll: float) -> Path:
    root = base / "node-0"
    for d in ("bin", "jobs/1", "agent", "checkpoints"):
        (root / d).mkdir(parents=True)
    for name in ("node_ctl.py", "agent.py"):
        shutil.copy(REPO / "templates" / name, root / "bin" / name)
    config = {
        "poll_seconds": poll,
        "idle_minutes": 30,
        "idle_util_percent": 5,
        "stall_minutes": 10,
        "on_stall": "report",
        "heartbeat_minutes": 15,
        "deadline": None,
        "provider": "local",
        "node": 0,
        "tag": TAG,
        "metadata": {},
        "node_id": "local-0",
        "spot": False,
    }
    (root / "agent" / "config.json").write_text(json.dumps(config))
    (root / "jobs" / "1" / "job.json").write_text(
        json.dumps({"checkpoint_dir": str(root / "checkpoints"), "tag": f"{TAG}1."})
    )
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--poll", type=float, default=5.0, help="poll_seconds (default: the spec's)")
    args = p.parse_args()
    procs: list[subprocess.Popen] = []
    agent = None
    with tempfile.TemporaryDirectory() as tmp:
        root = node(Path(tmp), args.poll)
        job_dir = root / "jobs" / "1"
        try:
            # the job: grows its log and bumps progress.json every second, as the template does
            job = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import json, sys, time\n"
                    "log, prog = sys.argv[1], sys.argv[2]\n"
                    "for step in range(10**9):\n"
                    "    open(log, 'a').write(f'step {step}\\n')\n"
                    "    open(prog, 'w').write(json.dumps({'step': step}))\n"
                    "    time.sleep(1)\n",
                    str(job_dir / "output.log"),
                    str(root / "checkpoints" / "progress.json"),
                ],
                env={**os.environ, "MLCLOUD_PROC_TAG": f"{TAG}1.0"},
            )
            procs.append(job)
            (job_dir / "waiter.pid").write_text(str(job.pid))
            baseline = subprocess.Popen(
                [sys.executable, "-c", f"import time\nwhile True: time.sleep({args.poll})"]
            )
            procs.append(baseline)
            out = subprocess.run(
                [sys.executable, str(root / "bin" / "agent.py"), "start", str(root)],
                capture_output=True,
                text=True,
                check=True,
            )
            agent = int(out.stdout.strip())
            time.sleep(1.0)  # past the agent's start-up
            a0, b0, t0 = cpu_seconds(agent), cpu_seconds(baseline.pid), time.monotonic()
            time.sleep(args.seconds)
            a1, b1, t1 = cpu_seconds(agent), cpu_seconds(baseline.pid), time.monotonic()
            samples = (root / "agent" / "samples.jsonl").read_text().splitlines()
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            if agent is not None:
                try:
                    os.kill(agent, 9)
                except ProcessLookupError:
                    pass
    wall = t1 - t0
    agent_pct = 100 * (a1 - a0) / wall
    base_pct = 100 * (b1 - b0) / wall
    gpus = json.loads(samples[-1])["gpus"] if samples else []
    print(f"poll every {args.poll:g}s for {wall:.0f}s, {len(samples)} samples, {len(gpus)} GPU(s)")
    print(f"agent:    {agent_pct:.3f}% of one core ({a1 - a0:.2f} CPU s)")
    print(f"baseline: {base_pct:.3f}% of one core (a Python process waking as often)")
    ok = agent_pct < TARGET
    print(f"{'ok' if ok else 'FAIL'}: target under {TARGET:g}% of a core")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
