"""Recovery of an elastic job: how fast a killed node is found lost, and how much work is lost.

Run from the repository root with the project's venv, as root (network namespaces):

    .venv/bin/python bench/recovery.py [--runs 5] [--victim node|head|both]

Each run: three sshd nodes in network namespaces of their own (tests/nsbridge.py), `up
--nodes 1:2` on them (the third a spare), `train` of the DDP template (one process per node,
a 0.1 s pause per step, a checkpoint every 20 steps, every step logged); at step 70, `kill -9`
of everything on the victim node. Measured per run:

  detection  kill -> the controller's lost-node line in train's output (target <= 15 s)
  recovered  kill -> the first step logged after the job resumed
  work lost  steps done before the kill that were done again (last step logged before the
             kill minus the step resumed from; at most one checkpoint interval, 20)

Prints each run and the median and worst of each; exits 1 if a run failed or detection
exceeded 15 s. Standard library only, plus mlcloud and tests/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
MLCLOUD = str(REPO / ".venv" / "bin" / "mlcloud")
DETECT_WITHIN = 15.0
STEPS, CKPT_EVERY, KILL_AT = 300, 20, 70  # killed halfway between two checkpoints


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MLCLOUD, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
        timeout=300,
    )  # fmt: skip


def one_run(victim: int, work: Path) -> dict:
    import nsbridge
    from test_recovery_e2e import SLOW, Lines

    env = {**os.environ, "MLCLOUD_HOME": str(work / "home"), "NO_COLOR": "1"}
    with nsbridge.NsBridge(3, work / "ns") as bridge:
        assert cli("init", str(work / "proj"), env=env).returncode == 0
        proj = work / "proj"
        (proj / "slow.py").write_text(SLOW)
        spec = proj / "mlcloud.yaml"
        spec.write_text(spec.read_text().replace("nproc_per_node: 2", "nproc_per_node: 1"))
        r = cli(
            "up", "bench", "--hosts", ",".join(bridge.targets), "--identity",
            str(bridge.client_key), "--nodes", "1:2", env=env,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        uid = json.loads(cli("status", "--json", env=env).stdout)["clusters"][0]["uid"]
        proc = subprocess.Popen(
            [MLCLOUD, "train", "bench", "slow.py", "-f", str(spec), "--", "--steps", str(STEPS),
             "--ckpt-every", str(CKPT_EVERY), "--log-every", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env,
        )  # fmt: skip
        try:
            out = Lines(proc.stdout)
            out.wait_for(r"rank 1/2 ", 120)
            out.wait_for(rf"\] step {KILL_AT} loss", 120)
            before = max(int(m) for m in re.findall(r"\] step (\d+) loss", out.text()))
            seen_before = len(out.lines)
            bridge.kill(victim)
            killed = time.monotonic()
            detected_at, _ = out.wait_for(r"\[mlcloud\] node\d .* lost: ", 60)
            proc.wait(timeout=300)
            text = out.text()
            if proc.returncode != 0 or f"done steps={STEPS}" not in text:
                raise RuntimeError(f"job did not complete (exit {proc.returncode}):\n{text}")
            after = out.lines[seen_before:]
            resumed = [int(m) for m in re.findall(r"resumed from step (\d+)", text)][-1]
            first_step = next(t for t, line in after if re.search(r"\] step \d+ loss", line))
            return {
                "detection": detected_at - killed,
                "recovered": first_step - killed,
                "work_lost": before - resumed,
            }
        finally:
            if proc.poll() is None:
                proc.kill()
            cli("down", "bench", "--yes", "--purge", env=env)
            shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--victim", choices=("node", "head", "both"), default="both")
    args = p.parse_args()
    victims = {"node": [1], "head": [0], "both": [1, 0]}[args.victim]
    ok = True
    for victim in victims:
        name = "head" if victim == 0 else "non-head node"
        results = []
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="mlcloud-bench-recovery-") as tmp:
                try:
                    r = one_run(victim, Path(tmp))
                except Exception as e:  # noqa: BLE001 (reported, counted as a failure)
                    print(f"{name} run {run + 1}: FAILED: {str(e)[-3000:]}", flush=True)
                    ok = False
                    continue
            results.append(r)
            print(
                f"{name} run {run + 1}: detection {r['detection']:.1f} s, recovered "
                f"{r['recovered']:.1f} s, work lost {r['work_lost']} step(s)",
                flush=True,
            )
        if results:
            for key, unit in (("detection", "s"), ("recovered", "s"), ("work_lost", "steps")):
                values = [r[key] for r in results]
                print(
                    f"{name}: {key} median {statistics.median(values):.1f} {unit}, "
                    f"worst {max(values):.1f} {unit} over {len(values)} run(s)"
                )
            ok = ok and max(r["detection"] for r in results) <= DETECT_WITHIN
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
