"""Recovery of an elastic job: how fast a lost node is found, and how much work is lost.

Run from the repository root with the project's venv, as root (network namespaces):

    .venv/bin/python bench/recovery.py [--runs 5] [--victim node|head|both]
    .venv/bin/python bench/recovery.py --silent [--runs 10]
    .venv/bin/python bench/recovery.py --provider aws|gce [--victim node|head|both]

Each run: three sshd nodes in network namespaces of their own (tests/nsbridge.py), `up
--nodes 1:2` on them (the third a spare), `train` of the DDP template (one process per node,
a 0.1 s pause per step, a checkpoint every 20 steps, every step logged); at step 70, `kill -9`
of everything on the victim node. Measured per run:

  detection  kill -> the controller's lost-node line in train's output (target <= 15 s)
  recovered  kill -> the first step logged after the job resumed
  work lost  steps done before the kill that were done again (last step logged before the
             kill minus the step resumed from; at most one checkpoint interval, 20)

`--silent`: the same cluster and job, but the victim's link is cut (`ip link set down` in its
namespace: packets dropped, no reset, as a reclaimed machine or a failed link) at step 20;
measured: detection, against the goal (median <= 10 s, worst <= 15 s at the default
settings). It also measures what staying in touch costs, on one namespaced node's link (its
veth's byte counters, both ways, packet headers included): an idle SSH connection (its
heartbeat alone), and `mlcloud autoscale` on it (a pass every 5 s: the probe that writes the
agent's heartbeat and reads the samples that came since the last pass, the node's file
holding at least the 120 a pass looks at, plus the SSH heartbeat), in bytes per node per
minute.

`--provider aws|gce` is described at `cloud_run` below.

Prints each run and the median and worst of each; exits 1 if a run failed or a goal was
missed. Standard library only, plus mlcloud and tests/.
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
import threading
import time
from collections.abc import Callable, Iterator
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


def _recovery(after: list[tuple[float, str]], killed: float, before: int) -> dict:
    """From the job's lines after the loss (each with when it came): back to training (the
    first step after the first resume), back on both nodes (the first step after the group
    is two again: a lost non-head node's replacement joined, or the restart after a head),
    and the work lost (the last step logged before the loss less the step first resumed
    from). A step logged before the survivors noticed the loss is not a resumption."""

    def first(pattern: str, since: float) -> tuple[float, str]:
        return next((t, x) for t, x in after if t >= since and re.search(pattern, x))

    resumed_at, line = first(r"resumed from step \d+", killed)
    resumed = int(re.search(r"resumed from step (\d+)", line).group(1))
    stepping, _ = first(r"\] step \d+ loss", resumed_at)
    two, _ = first(r"\] rank \d/2 ", killed)
    both, _ = first(r"\] step \d+ loss", two)
    return {
        "recovered": stepping - killed,
        "both": both - killed,
        "work_lost": max(0, before - resumed),  # survivors checkpoint on SIGTERM (a restart)
    }


def one_run(victim: int, work: Path, silent: bool = False) -> dict:
    import nsbridge
    from test_recovery_e2e import SLOW, Lines

    env = {**os.environ, "MLCLOUD_HOME": str(work / "home"), "NO_COLOR": "1"}
    for name in DEFAULT_WAITS:  # the defaults, as users run it
        env.pop(f"MLCLOUD_{name}", None)
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
            if silent:
                out.wait_for(r"\] step 20 loss", 120)
                bridge.cut(victim)
                cut = time.monotonic()
                detected_at, line = out.wait_for(r"\[mlcloud\] node\d .* lost: ", 60)
                return {"detection": detected_at - cut, "line": line}
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
            return {
                "detection": detected_at - killed,
                **_recovery(out.lines[seen_before:], killed, before),
            }
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if not silent:  # (a cut node would hold `down` to its timeouts; the bridge ends all)
                cli("down", "bench", "--yes", "--purge", env=env)
            shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)


DEFAULT_WAITS = ("SSH_HEARTBEAT_EVERY", "SSH_HEARTBEAT_TIMEOUT")
SILENT_MEDIAN, SILENT_WORST = 10.0, 15.0
COST_WINDOW = 30.0  # seconds each cost is measured over


def _link_bytes(bridge, i: int) -> int:
    """Bytes through node i's link so far, both ways (the outer veth's counters)."""
    out = subprocess.run(
        ["ip", "-s", "-j", "link", "show", "dev", bridge._links(i)[0]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    stats = json.loads(out.stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def heartbeat_cost(work: Path) -> tuple[float, float]:
    """(an idle SSH connection, `autoscale` on the node): bytes per node per minute."""
    import nsbridge

    from mlcloud.remote.ssh import SshTarget, SshTransport

    env = {**os.environ, "MLCLOUD_HOME": str(work / "home"), "NO_COLOR": "1"}
    for name in DEFAULT_WAITS:
        env.pop(f"MLCLOUD_{name}", None)
        os.environ.pop(f"MLCLOUD_{name}", None)
    with nsbridge.NsBridge(1, work / "ns") as bridge:
        os.environ["MLCLOUD_NETGUARD_ALLOW"] = bridge.subnet  # (tests/ guard this process)
        t = SshTransport(
            SshTarget(bridge.hosts[0], nsbridge.PORT, "root", str(bridge.client_key)), "node0"
        )
        t.run("true")
        before = _link_bytes(bridge, 0)
        time.sleep(COST_WINDOW)
        idle = (_link_bytes(bridge, 0) - before) * 60 / COST_WINDOW
        t.close()
        r = cli("up", "cost", "--hosts", bridge.targets[0], "--identity", str(bridge.client_key),
                env=env)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        uid = json.loads(cli("status", "--json", env=env).stdout)["clusters"][0]["uid"]
        samples = Path.home() / ".mlcloud" / uid / "node-0" / "agent" / "samples.jsonl"
        try:
            deadline = time.monotonic() + 30
            while not samples.exists() or not samples.read_text().strip():
                if time.monotonic() > deadline:
                    raise RuntimeError("the agent wrote no sample")
                time.sleep(0.2)
            line = samples.read_text().splitlines()[-1]
            with samples.open("a") as f:  # the window a pass reads in steady state
                f.write((line + "\n") * 120)
            proc = subprocess.Popen(
                [MLCLOUD, "autoscale", "cost"], env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                time.sleep(8)  # connected, passes under way
                before = _link_bytes(bridge, 0)
                time.sleep(COST_WINDOW)
                passes = (_link_bytes(bridge, 0) - before) * 60 / COST_WINDOW
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        finally:
            cli("down", "cost", "--yes", "--purge", env=env)
            shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)
    return idle, passes


def silent(runs: int) -> bool:
    values = []
    ok = True
    for run in range(runs):
        with tempfile.TemporaryDirectory(prefix="mlcloud-bench-recovery-") as tmp:
            try:
                r = one_run(1, Path(tmp), silent=True)
            except Exception as e:  # noqa: BLE001 (reported, counted as a failure)
                print(f"silent cut run {run + 1}: FAILED: {str(e)[-3000:]}", flush=True)
                ok = False
                continue
        values.append(r["detection"])
        print(
            f"silent cut run {run + 1}: detection {r['detection']:.1f} s ({r['line']})", flush=True
        )
    if values:
        median, worst = statistics.median(values), max(values)
        print(
            f"silent cut, non-head node, default settings: detection median {median:.1f} s "
            f"(goal <= {SILENT_MEDIAN:g} s), worst {worst:.1f} s (goal <= {SILENT_WORST:g} s) "
            f"over {len(values)} run(s)"
        )
        ok = ok and median <= SILENT_MEDIAN and worst <= SILENT_WORST
    with tempfile.TemporaryDirectory(prefix="mlcloud-bench-recovery-") as tmp:
        idle, passes = heartbeat_cost(Path(tmp))
    print(
        f"staying in touch, per node per minute on its link (headers included): idle SSH "
        f"connection {idle / 1000:.1f} kB; `autoscale` (a pass every 5 s, the agent's newest "
        f"samples read, 120 held) {passes / 1000:.1f} kB"
    )
    return ok


# -- on the fakes: --provider aws|gce ------------------------------------------------------


@contextlib.contextmanager
def fake_cloud(provider: str, work: Path) -> Iterator[tuple[Callable, Callable]]:
    """The fake cloud, configured in this process's environment (the CLI inherits it), as the
    tests run it: a plain moto server, or the fake Compute API. Yields live() -> {instance:
    private address} and reclaim(instance): the cloud ends it (terminated; a GCE reclaim)."""
    with contextlib.ExitStack() as stack:
        import pytest

        mp = stack.enter_context(pytest.MonkeyPatch.context())
        if provider == "aws":
            import logging

            import boto3
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.CRITICAL)  # a line per request

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            stack.callback(server.stop)
            for var, value in (
                ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_CONFIG_FILE", str(work / "none")),
                ("AWS_SHARED_CREDENTIALS_FILE", str(work / "none")),
                ("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}"),
            ):  # fmt: skip
                mp.setenv(var, value)
            for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
                mp.delenv(var, raising=False)
            ec2 = boto3.client("ec2", region_name="us-east-1")

            def live() -> dict[str, str]:
                out = ec2.describe_instances(
                    Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
                )
                return {
                    i["InstanceId"]: i.get("PrivateIpAddress", "")
                    for r in out["Reservations"]
                    for i in r["Instances"]
                }

            def reclaim(node_id: str) -> None:
                ec2.terminate_instances(InstanceIds=[node_id])

        else:
            from fakes.gce_server import DEFAULT_PROJECT, GceFake
            from gce_fixtures import TEST_OP_SECONDS, _configure

            fake = stack.enter_context(GceFake(op_seconds=TEST_OP_SECONDS))
            key = work / "gce-key.json"
            fake.write_credentials(str(key), DEFAULT_PROJECT)
            _configure(mp, work, fake.url, key, DEFAULT_PROJECT)

            def live() -> dict[str, str]:
                return {
                    i["name"]: i["networkInterfaces"][0].get("networkIP", "")
                    for i in fake.instances()
                    if i["status"] in ("PROVISIONING", "STAGING", "RUNNING")
                }

            def reclaim(node_id: str) -> None:
                (zone,) = {
                    i["zone"].rsplit("/", 1)[-1] for i in fake.instances() if i["name"] == node_id
                }
                fake.preempt(zone, node_id)

        yield live, reclaim


@contextlib.contextmanager
def private_addresses(live: Callable[[], dict[str, str]]) -> Iterator[None]:
    """Each instance's private address on this machine's loopback as soon as the cloud has
    it, so torch's rendezvous and gloo bind and connect there as on the cloud's network (the
    nodes are sshd daemons on loopback); all removed at the end. Nothing leaves loopback."""
    added: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            for ip in set(live().values()) - added - {""}:
                subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], capture_output=True)
                added.add(ip)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        for ip in added:
            subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)


def cloud_run(provider: str, victim: int, work: Path) -> dict:
    """An elastic job (`--nodes 1:2`, the DDP template, real torchrun) on the fake cloud, its
    instances sshd daemons on loopback reached through the tests' proxy command (an address
    the cloud gave takes the next free daemon); at step 70 the victim's daemon and everything
    it started are killed (SIGKILL) and the cloud ends its instance (EC2: terminated; GCE:
    reclaimed). The controller in `train` finds it lost and replaces it with a new instance
    (the next daemon), which is bootstrapped and joins (a head: the job restarts on both)."""
    from conftest import relay_pool
    from sshnodes import SshNodes
    from test_recovery_e2e import SLOW, Lines

    env_home = {"MLCLOUD_HOME": str(work / "home"), "NO_COLOR": "1"}
    with (
        fake_cloud(provider, work) as (live, reclaim),
        SshNodes(4, work / "sshd", first_host=200) as nodes,
        private_addresses(live),
    ):
        env = {**os.environ, **env_home}
        for name in DEFAULT_WAITS:
            env.pop(f"MLCLOUD_{name}", None)
        pool, proxy = relay_pool(work, nodes.hosts)
        assert cli("init", str(work / "proj"), env=env).returncode == 0
        proj = work / "proj"
        (proj / "slow.py").write_text(SLOW)
        spec = proj / "mlcloud.yaml"
        spec.write_text(spec.read_text().replace("nproc_per_node: 2", "nproc_per_node: 1"))
        kind = ["--instance-type", "g5.xlarge"]
        if provider == "gce":
            kind = ["--instance-type", "n1-standard-8+T4:1", "--region", "us-central1"]
        r = cli(
            "up", "bench", "--provider", provider, "--nodes", "1:2", *kind,
            "--identity", str(nodes.client_key), "--ssh-user", nodes.user,
            "--ssh-port", str(nodes.port), "--proxy-command", proxy,
            "--allow-ssh-from", "127.0.0.1/32", "--yes", env=env,
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
            out.wait_for(r"rank 1/2 ", 180)
            out.wait_for(rf"\] step {KILL_AT} loss", 180)
            node = json.loads(cli("status", "--json", env=env).stdout)["clusters"][0]["nodes"][
                victim
            ]
            daemon = nodes.hosts.index(json.loads(pool.read_text())["routes"][node["ip"]])
            before = max(int(m) for m in re.findall(r"\] step (\d+) loss", out.text()))
            seen_before = len(out.lines)
            nodes.kill(daemon)
            killed = time.monotonic()
            reclaim(node["id"])
            detected_at, line = out.wait_for(r"\[mlcloud\] node\d .* lost: ", 60)
            proc.wait(timeout=400)
            text = out.text()
            if proc.returncode != 0 or f"done steps={STEPS} world_size=2" not in text:
                raise RuntimeError(
                    f"job did not complete on two nodes (exit {proc.returncode}):\n{text[-4000:]}"
                )
            return {
                "detection": detected_at - killed,
                **_recovery(out.lines[seen_before:], killed, before),
                "why": line.split(" lost: ", 1)[1],
            }
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            cli("down", "bench", "--yes", "--purge", env=env)
            shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)


def clouds(provider: str, victims: list[int]) -> bool:
    rows, ok = [], True
    for victim in victims:
        name = "head" if victim == 0 else "non-head node"
        with tempfile.TemporaryDirectory(prefix="mlcloud-bench-recovery-") as tmp:
            try:
                r = cloud_run(provider, victim, Path(tmp))
            except Exception as e:  # noqa: BLE001 (reported, counted as a failure)
                print(f"{provider}, {name}: FAILED: {str(e)[-3000:]}", flush=True)
                ok = False
                continue
        rows.append((name, r))
        ok = ok and r["detection"] <= DETECT_WITHIN and r["work_lost"] <= CKPT_EVERY
    print(f"{provider} (fake cloud, one run each), goal: detection <= {DETECT_WITHIN:g} s, "
          f"work lost <= {CKPT_EVERY} steps (one checkpoint interval)")  # fmt: skip
    print(
        f"{'lost':<15} {'detection':>10} {'back to training':>17} {'on 2 nodes again':>17} "
        f"{'work lost':>10}  found by"
    )
    for name, r in rows:
        print(
            f"{name:<15} {r['detection']:>8.1f} s {r['recovered']:>15.1f} s {r['both']:>15.1f} s "
            f"{r['work_lost']:>4} steps  {r['why']}"
        )
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=None, help="default: 10 with --silent, else 5")
    p.add_argument("--victim", choices=("node", "head", "both"), default="both")
    p.add_argument("--silent", action="store_true", help="cut the link instead of kill -9")
    p.add_argument("--provider", choices=("aws", "gce"), help="on the fake cloud, one run each")
    args = p.parse_args()
    if args.silent:
        return 0 if silent(args.runs or 10) else 1
    if args.provider:
        return (
            0
            if clouds(args.provider, {"node": [1], "head": [0], "both": [1, 0]}[args.victim])
            else 1
        )
    args.runs = args.runs or 5
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
