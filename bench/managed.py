"""A managed job's recovery from reclaims (issue 20): back to training, steps lost, dollars.

Run from the repository root with the project's venv:

    .venv/bin/python bench/managed.py [--reclaims 5] [--json]

On the fakes, all started and stopped here (by PID; nothing leaves loopback): a plain moto
server (EC2, IAM, S3) behind the ClientToken stand-in (tests/fakes/ec2_tokens.py), instances
reached through the tests' relay (tests/tcp_relay.py) on loopback sshd daemons (an address the
cloud gave takes the next free daemon). `mlcloud launch` runs a plain script that knows nothing
of buckets: it resumes after the newest ckpt-<step>.json in MLCLOUD_CHECKPOINT_DIR, logs each
step (a PAUSE_S pause each) and writes a checkpoint every CKPT_EVERY steps. The job's only node
is reclaimed N times, each time RECLAIM_AFTER steps after it resumed (8 steps past a
checkpoint): its instance terminated in moto and its sshd killed with everything it started.
The jobs run through the torchrun stand-in (tests/torchrun_standin.py), not real torchrun:
the subject is mlcloud's recovery, and torch's own start would add the same to both columns.

Two runs of the same reclaims:

  bucket   storage.checkpoints on the moto S3: the new node restores the newest checkpoint
  scratch  the baseline, no storage.checkpoints: the new node's disk is empty, so the job
           starts again from step 0

Measured per reclaim:

  found      reclaim -> launch says it makes the next cluster
  back       reclaim -> the first step the job logs on the new cluster (training again)
  lost       the last step logged before the reclaim minus the step it resumed from
  dollars    the new cluster's $/h x back, plus the lost steps' time (lost x the measured
             seconds per step) x that $/h (they are done again there)

Prints a table per mode, then bucket beside scratch with their ratio (back: the median over
the reclaims; steps lost and dollars: the totals), then the goal: back within 60 s of every
reclaim plus the cloud's boot time (0 s on the fakes: moto's instances run at once and their
sshd already listens), at most one checkpoint interval lost, nothing left running. Exits 1
if a run failed or the goal was missed. `--json`: one JSON object instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import test_recovery_e2e  # noqa: E402  (its Lines: a process's output as it comes)

MLCLOUD = str(REPO / ".venv" / "bin" / "mlcloud")
CKPT_EVERY, PAUSE_S = 10, 0.4
RECLAIM_AFTER = CKPT_EVERY + 8  # steps after the resume: 8 steps (3.2 s) past a checkpoint
BACK_WITHIN, BOOT_S = 60.0, 0.0  # the goal; the fakes' boot time
NAME = "bench"

# a script that knows nothing of buckets: resumes after its newest checkpoint on its disk
JOB = """\
import glob, json, os, sys, time
steps, every, pause = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
d = os.environ["MLCLOUD_CHECKPOINT_DIR"]
os.makedirs(d, exist_ok=True)
have = [int(p.rsplit("-", 1)[1].split(".")[0]) for p in glob.glob(os.path.join(d, "ckpt-*.json"))]
start = max(have, default=0)
print(f"resumed from step {start}", flush=True)
for step in range(start + 1, steps + 1):
    time.sleep(pause)
    print(f"step {step}", flush=True)
    if step % every == 0:
        tmp = os.path.join(d, f".ckpt-{step}.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step}, f)
        os.replace(tmp, os.path.join(d, f"ckpt-{step}.json"))
print("done", flush=True)
"""


class Lines(test_recovery_e2e.Lines):
    """A process's output, read as it comes, each line with the time it arrived; its end
    marked, so a wait on a process that ended says so at once."""

    def _read(self, stream) -> None:
        super()._read(stream)
        with self.cond:
            self.lines.append((time.monotonic(), "\0"))  # the end
            self.cond.notify_all()

    def wait_since(self, pattern: str, timeout: float, since: int = 0) -> tuple[int, float, str]:
        """(index, time, line) of the first line from index `since` on matching pattern."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(since, len(self.lines)):
                    t, line = self.lines[i]
                    if line == "\0":
                        raise RuntimeError(f"launch ended before {pattern!r}:\n{self.tail()}")
                    if re.search(pattern, line):
                        return i, t, line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no {pattern!r} in {timeout:g} s:\n{self.tail()}")
                self.cond.wait(left)

    def tail(self, n: int = 40) -> str:
        with self.cond:
            return "\n".join(x for _, x in self.lines[-n:])


@contextlib.contextmanager
def fake_aws(work: Path) -> Iterator[str]:
    """A plain moto server behind the ClientToken stand-in, the CLI's environment pointed at
    it (this process's: the CLI inherits it). Yields the endpoint."""
    from fakes.ec2_tokens import Ec2Tokens

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a process of its own: it prints a line per request it cannot route (the pricing API)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_AMIS_PATH": str(REPO / "tests" / "data" / "amis.json")},
    )  # fmt: skip  (the tests' AMI list: it has Deep Learning AMIs to find)
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            break
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the moto server did not start (exit {server.poll()})")
        time.sleep(0.1)
    stand_in = Ec2Tokens(f"http://127.0.0.1:{port}")
    saved = dict(os.environ)
    try:
        for var in list(os.environ):  # mlcloud at its defaults, in a home of its own
            if var.startswith("MLCLOUD_") or var in (
                "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "PYTHONUNBUFFERED",
            ):  # fmt: skip
                os.environ.pop(var)
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(work / "none"),
            AWS_SHARED_CREDENTIALS_FILE=str(work / "none"), AWS_ENDPOINT_URL=stand_in.url,
            NO_COLOR="1",
        )  # fmt: skip
        yield stand_in.url
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stand_in.close()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def reset(endpoint: str) -> None:
    """moto and the stand-in emptied (moto's reset endpoint, as the tests do)."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset", data=b"", method="POST")
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30):
        pass


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MLCLOUD, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300
    )


LEFT = ("instances", "security_groups", "key_pairs")


def left_running() -> dict[str, int]:
    """What mlcloud made that is still there in moto (the cloud empty: all zero)."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1")
    live = ec2.describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running", "stopping"]}]
    )
    groups = [
        g for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"
    ]
    return {
        "instances": sum(len(r["Instances"]) for r in live["Reservations"]),
        "security_groups": len(groups),
        "key_pairs": len(ec2.describe_key_pairs()["KeyPairs"]),
    }


def one_mode(bucket: bool, reclaims: int, endpoint: str, work: Path) -> dict:
    """Launch the job, reclaim its node `reclaims` times, let it finish; the measures."""
    import boto3
    from conftest import STANDIN_VAR, TORCHRUN_STANDIN, relay_pool
    from sshnodes import SshNodes

    reset(endpoint)
    home = work / "home"
    os.environ["MLCLOUD_HOME"] = str(home)
    steps = (reclaims + 2) * CKPT_EVERY  # past the last reclaim's step in either mode
    project = work / "proj"
    project.mkdir()
    (project / "job.py").write_text(JOB)
    storage = ""
    if bucket:
        boto3.client("s3").create_bucket(Bucket="ckpts")
        storage = "storage: {checkpoints: 's3://ckpts/runs'}\n"
    spec = project / "mlcloud.yaml"
    spec.write_text(
        "workdir: .\nprovider: aws\nresources: {instance_type: g5.xlarge}\n"
        + storage
        + f"recover: {{placements: ['aws:us-east-1'], max_restarts: {reclaims + 1}}}\n"
        # what the instance profile gives a real node, given here as the node's own keys
        f"envs:\n  AWS_ENDPOINT_URL: {endpoint}\n  AWS_ACCESS_KEY_ID: node-key\n"
        "  AWS_SECRET_ACCESS_KEY: node-secret\n  AWS_DEFAULT_REGION: us-east-1\n"
        "  AWS_EC2_METADATA_DISABLED: 'true'\n"
    )
    ec2 = boto3.client("ec2", region_name="us-east-1")
    uids: set[str] = set()
    try:
        with SshNodes(
            reclaims + 1, work / "sshd", first_host=200,
            extra_env=(f"{STANDIN_VAR}={TORCHRUN_STANDIN}",),
        ) as nodes:  # fmt: skip
            pool, proxy = relay_pool(work, nodes.hosts)
            launch = subprocess.Popen(
                [
                    MLCLOUD, "launch", NAME, "-f", str(spec), "--identity", str(nodes.client_key),
                    "--ssh-user", nodes.user, "--ssh-port", str(nodes.port), "--proxy-command",
                    proxy, "--allow-ssh-from", "127.0.0.1/32", "--yes", "job.py", "--",
                    str(steps), str(CKPT_EVERY), str(PAUSE_S),
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, cwd=work,
            )  # fmt: skip
            out = Lines(launch.stdout)
            try:
                rows = reclaim_all(out, nodes, pool, ec2, reclaims, uids)
                code = launch.wait(timeout=300)
                out.th.join(timeout=10)
                text = out.tail(10**6)
                if code != 0 or "] done" not in text:
                    raise RuntimeError(f"launch exited {code}:\n{out.tail()}")
            finally:
                if launch.poll() is None:
                    cli("cancel", NAME)
                    launch.kill()
                    launch.wait()
            job = json.loads(cli("jobs", "--json").stdout)["jobs"][0]
            uids |= {c["uid"] for c in job["clusters"] if c["uid"]}
            left = left_running()
    finally:
        for uid in uids:  # the nodes' directories (on this machine's real home)
            shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)
    for r, c in zip(rows, job["clusters"][1:], strict=True):
        r["usd_per_hour"] = c["usd_per_hour"] or 0.0
    times = [t for t, x in out.lines if STEP.search(x)]
    step_s = statistics.median(b - a for a, b in zip(times, times[1:], strict=False))
    for r in rows:
        r["usd"] = round(r["usd_per_hour"] * (r["back_s"] + r["steps_lost"] * step_s) / 3600, 6)
    return {
        "rows": rows,
        "step_s": round(step_s, 3),
        "restarts": job["restarts"],
        "status": job["status"],
        "restored": len(re.findall(r"checkpoints: restored step \d+", text)),
        "left_running": left,
    }


STEP = re.compile(r"\] step (\d+)$")
RESUMED = r"\] resumed from step (\d+)"


def reclaim_all(out: Lines, nodes, pool: Path, ec2, reclaims: int, uids: set[str]) -> list[dict]:
    """Reclaim the job's node `reclaims` times, each RECLAIM_AFTER steps after it resumed;
    one row of measures per reclaim."""
    rows = []
    at, _, line = out.wait_since(RESUMED, 180)
    for k in range(1, reclaims + 1):
        resumed = int(re.search(RESUMED, line).group(1))
        (rec,) = [
            c
            for c in json.loads(cli("status", "--json").stdout)["clusters"]
            if c["name"] == f"{NAME}-{k}"
        ]
        (node,) = rec["nodes"]
        uids.add(rec["uid"])
        daemon = nodes.hosts.index(json.loads(pool.read_text())["routes"][node["ip"]])
        out.wait_since(rf"\] step {resumed + RECLAIM_AFTER}$", 120, at)
        # a Spot reclaim: the instance and its machine go at once
        ec2.terminate_instances(InstanceIds=[node["id"]])
        nodes.kill(daemon)
        reclaimed = time.monotonic()
        with out.cond:
            seen = len(out.lines)
        _, found, _ = out.wait_since(rf"making {NAME}-{k + 1} ", 120, seen)
        nxt, _, line = out.wait_since(RESUMED, 180, seen)
        _, back, _ = out.wait_since(STEP.pattern, 60, nxt)
        with out.cond:  # every step the old node logged, some arriving after the reclaim
            before = max(int(m.group(1)) for _, x in out.lines[at:nxt] if (m := STEP.search(x)))
        rows.append(
            {
                "reclaim": k,
                "found_s": round(found - reclaimed, 2),
                "back_s": round(back - reclaimed, 2),
                "last_step": before,
                "resumed_from": int(re.search(RESUMED, line).group(1)),
            }
        )
        rows[-1]["steps_lost"] = before - rows[-1]["resumed_from"]
        at = nxt
    return rows


SUMMARY = (  # (what, key, how the reclaims are summed up, unit)
    ("back to training", "back_s", "median", "s"),
    ("steps lost", "steps_lost", "total", "steps"),
    ("dollars of the recoveries", "usd", "total", "USD"),
)


def summary(result: dict) -> list[dict]:
    """Each figure for both modes over the reclaims, and the ratio bucket / scratch."""
    out = []
    for what, key, how, unit in SUMMARY:
        fold = statistics.median if how == "median" else sum
        b, s = (fold(r[key] for r in result[m]["rows"]) for m in ("bucket", "scratch"))
        out.append(
            {"what": f"{what} ({how})", "unit": unit, "bucket": round(b, 6), "scratch": round(s, 6),
             "ratio": round(b / s, 3) if s else None}
        )  # fmt: skip
    return out


def report(result: dict) -> None:
    print(
        f"managed job on one node, reclaimed {result['reclaims']} times (moto EC2 + S3, "
        f"loopback sshd, the torchrun stand-in); a checkpoint every {CKPT_EVERY} steps, each "
        f"reclaim {RECLAIM_AFTER} steps after the job resumed"
    )
    for mode, title in (("bucket", "bucket restore"), ("scratch", "baseline, from scratch")):
        m = result[mode]
        print(
            f"\n{title}: {m['status']}, {m['restarts']} restarts, {m['restored']} restores, "
            f"{m['step_s']:.2f} s/step"
        )
        print(
            f"{'reclaim':>7} {'found':>8} {'back':>8} {'last step':>9} {'resumed':>7} "
            f"{'lost':>5} {'$/h':>6} {'dollars':>9}"
        )
        for r in m["rows"]:
            print(
                f"{r['reclaim']:>7} {r['found_s']:>6.1f} s {r['back_s']:>6.1f} s "
                f"{r['last_step']:>9} {r['resumed_from']:>7} {r['steps_lost']:>5} "
                f"{r['usd_per_hour']:>6.2f} {r['usd']:>9.6f}"
            )
    print(f"\n{'':<38} {'bucket':>10} {'scratch':>10}  bucket/scratch")
    for row in result["summary"]:
        fmt = ".1f" if row["unit"] == "s" else (".5f" if row["unit"] == "USD" else "d")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(
            f"{row['what'] + ', ' + row['unit']:<38} {row['bucket']:>10{fmt}} "
            f"{row['scratch']:>10{fmt}}  {ratio}"
        )
    g = result["goal"]
    left = ", ".join(f"{n} {k}" for k, n in g["left_running"].items() if n) or "nothing"
    print(
        f"\ngoal: back within {BACK_WITHIN:g} s of every reclaim plus the cloud's boot time "
        f"({BOOT_S:g} s on the fakes: moto's instances run at once, their sshd already "
        f"listening), at most {CKPT_EVERY} steps (one checkpoint interval) lost, nothing left "
        f"running: worst back {g['worst_back_s']:.1f} s, worst lost {g['worst_lost']} steps, "
        f"{left} left running: {'met' if g['met'] else 'MISSED'}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reclaims", type=int, default=5, help="reclaims per mode (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object, for a machine")
    args = p.parse_args()
    if not 1 <= args.reclaims <= 50:  # a daemon each on 127.0.0.200..254
        p.error("--reclaims: 1 to 50")
    result: dict = {"reclaims": args.reclaims, "ckpt_every": CKPT_EVERY, "boot_s": BOOT_S}
    failed = None
    with tempfile.TemporaryDirectory(prefix="mlcloud-bench-managed-") as tmp:
        with fake_aws(Path(tmp)) as endpoint:
            for mode in ("bucket", "scratch"):
                work = Path(tmp) / mode
                work.mkdir()
                try:
                    result[mode] = one_mode(mode == "bucket", args.reclaims, endpoint, work)
                except Exception as e:  # noqa: BLE001 (reported, counted as a failure)
                    failed = f"{mode}: FAILED: {str(e)[-3000:]}"
                    break
    if failed:
        print(failed, file=sys.stderr)
        return 1
    rows = result["bucket"]["rows"]
    worst_back, worst_lost = max(r["back_s"] for r in rows), max(r["steps_lost"] for r in rows)
    left = {k: sum(result[m]["left_running"][k] for m in ("bucket", "scratch")) for k in LEFT}
    met = (
        worst_back <= BACK_WITHIN + BOOT_S
        and worst_lost <= CKPT_EVERY
        and result["bucket"]["restored"] == args.reclaims
        and not any(left.values())
    )
    result["summary"] = summary(result)
    result["goal"] = {
        "worst_back_s": worst_back, "worst_lost": worst_lost, "left_running": left, "met": met,
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
