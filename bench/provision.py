"""EC2 API calls and wall time of the AWS provider's `up` and `down` for 1, 8 and 64 nodes.

Run from the repository root with the project's venv:

    .venv/bin/python bench/provision.py [--sizes 1,8,64] [--runs N]

Starts a plain moto EC2 server on loopback (ThreadedMotoServer, reached through
AWS_ENDPOINT_URL; it lacks placement groups, so N >= 2 goes without one after one failed
DescribePlacementGroups, as on users' CI) and drives AwsProvider exactly as the engine does
(mlcloud/provision/lifecycle.py):

  up    `up` + `_provision`, cloud part only: check, placements, then for the first place
        prepare, list, create(N - listed); SSH bootstrap is out of scope (not measured);
  down  `_teardown`: list, terminate (waits until terminated), list (confirm), cleanup.

Each phase uses a fresh AwsProvider (a fresh CLI process in real use), so its wall time
includes creating the boto3 session and EC2 client (no imports: boto3 is already loaded).
Every EC2 call is counted per operation by a botocore `before-call` handler on the provider's
client; DescribeInstances polls made by waiters are counted apart (they depend on how fast
instances change state, not on mlcloud), and HTTP attempts (`before-send`) reveal retries.
One untimed warm-up cycle first (moto's first use of a region builds its backend); then the
sizes are run `--runs` times, interleaved round-robin, and the median wall time is shown next
to the wall time of `python -c "import boto3"` measured in the same run.

PASS needs, for every size: RunInstances == 1 per up; up and down return/leave the right
nodes (N created, 0 non-terminated instances and no tagged security group, key pair or
placement group left after down); the same calls on every run; the calls of up and of down
(waiter polls apart) equal for every N >= 2, and for N = 1 fewer only by the placement-group
calls (one node needs no cluster placement group); one waiter poll per wait (moto's instances
change state at once). Exit code 1 on FAIL. Standard library, boto3, moto and mlcloud only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
INSTANCE_TYPE = "g5.xlarge"
PG_OPS = {"DescribePlacementGroups", "CreatePlacementGroup", "DeletePlacementGroup"}
WAITER = "waiter:DescribeInstances"


def _sigterm(signum, frame):  # run the finally blocks (stop the server) on SIGTERM too
    raise SystemExit(128 + signum)


@dataclass
class Phase:
    """What one `up` or `down` did: calls per operation, waiter polls, HTTP attempts, time."""

    calls: Counter = field(default_factory=Counter)  # operation -> calls (waiters apart)
    waiter_polls: int = 0
    attempts: int = 0  # HTTP requests sent, retries included
    wall: float = 0.0
    client_s: float = 0.0  # of which: boto3 session + EC2 client creation

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def signature(self) -> tuple:
        return (tuple(sorted(self.calls.items())), self.waiter_polls)


class _Waiting:
    """True while a botocore waiter runs, so its DescribeInstances polls are counted apart."""

    depth = 0

    @classmethod
    def install(cls) -> None:
        import botocore.waiter

        original = botocore.waiter.Waiter.wait

        def wait(self, **kwargs):
            cls.depth += 1
            try:
                return original(self, **kwargs)
            finally:
                cls.depth -= 1

        botocore.waiter.Waiter.wait = wait  # the generated waiter classes call Waiter.wait


def counted_provider(phase: Phase):
    """A fresh AwsProvider whose EC2 client counts every call into `phase`."""
    from mlcloud.providers.aws.provider import AwsProvider

    t0 = time.perf_counter()
    p = AwsProvider()
    client = p.api.client(REGION)  # creates the client: register before its first call

    def before_call(model, **_):
        if _Waiting.depth:
            phase.waiter_polls += 1
        else:
            phase.calls[model.name] += 1

    def before_send(**_):
        phase.attempts += 1

    client.meta.events.register("before-call.ec2", before_call)
    client.meta.events.register("before-send.ec2", before_send)
    phase.client_s = time.perf_counter() - t0
    return p


def up(name: str, uid: str, n: int) -> tuple[Phase, list]:
    """The provider calls of lifecycle.up/_provision for a new cluster, up to (not incl.) SSH."""
    from mlcloud.providers.base import ClusterRef, ProvisionRequest, SshOptions

    phase = Phase()
    t0 = time.perf_counter()
    p = counted_provider(phase)
    request = ProvisionRequest(
        count=n,
        instance_type=INSTANCE_TYPE,
        region=REGION,
        ssh=SshOptions(allowed_cidrs=("127.0.0.1/32",)),
    )
    p.check(request)  # lifecycle.up, before the intent row
    ref = ClusterRef(name, uid, "bench")  # a new cluster: no region chosen yet
    region, zone = p.placements(request)[0]  # the first place has capacity in moto
    here = replace(ref, region=region)
    req = replace(request, region=region, zone=zone)
    req = p.prepare(here, req).request
    nodes = p.list(here)
    if len(nodes) < n:
        nodes = nodes + p.create(here, req, n - len(nodes))
    if len(nodes) > n:
        p.terminate(here, nodes[n:])
        nodes = nodes[:n]
    phase.wall = time.perf_counter() - t0
    return phase, nodes


def down(name: str, uid: str) -> Phase:
    """The provider calls of lifecycle._teardown (the ref as `ref_of` rebuilds it from state)."""
    from mlcloud.providers.base import ClusterRef

    phase = Phase()
    t0 = time.perf_counter()
    p = counted_provider(phase)
    ref = ClusterRef(name, uid, "bench", REGION)
    live = p.list(ref)
    if live:
        p.terminate(ref, live)
    left = p.list(ref)
    if left:
        raise RuntimeError(f"{len(left)} node(s) of {name} not terminated after terminate")
    p.cleanup(ref)
    phase.wall = time.perf_counter() - t0
    return phase


def leftovers(ec2, uid: str) -> dict[str, int]:
    """What moto still holds (uncounted client): this cluster's resources, all live instances."""
    f = [{"Name": "tag:mlcloud-cluster", "Values": [uid]}]
    mine = [
        i
        for r in ec2.describe_instances(Filters=f, MaxResults=1000)["Reservations"]
        for i in r["Instances"]
    ]
    everything = [
        i for r in ec2.describe_instances(MaxResults=1000)["Reservations"] for i in r["Instances"]
    ]
    return {
        "instances": len(mine),
        "non-terminated": sum(i["State"]["Name"] != "terminated" for i in mine),
        "non-terminated (all of moto)": sum(i["State"]["Name"] != "terminated" for i in everything),
        "security groups": len(ec2.describe_security_groups(Filters=f)["SecurityGroups"]),
        "key pairs": len(ec2.describe_key_pairs(Filters=f)["KeyPairs"]),
        "placement groups": _placement_groups(ec2, f),
    }


def _placement_groups(ec2, filters) -> int:
    """0 where the endpoint has no placement groups (a plain moto server)."""
    from botocore.parsers import ResponseParserError

    try:
        return len(ec2.describe_placement_groups(Filters=filters)["PlacementGroups"])
    except ResponseParserError:
        return 0


def import_boto3_s(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import boto3"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,8,64", help="node counts, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (median wall time)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    signal.signal(signal.SIGTERM, _sigterm)

    with tempfile.TemporaryDirectory(prefix="mlcloud-bench-") as tmp:
        port = free_port()
        for var in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN"):
            os.environ.pop(var, None)
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION=REGION,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=str(Path(tmp) / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(Path(tmp) / "no-aws-credentials"),
            MLCLOUD_HOME=str(Path(tmp) / "home"),
            MLCLOUD_OFFLINE="1",
            MOTO_AMIS_PATH=str(REPO / "tests" / "data" / "amis.json"),  # before importing moto
        )
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        _Waiting.install()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            return bench(sizes, args.runs, boto3.client("ec2", region_name=REGION))
        finally:
            server.stop()


def bench(sizes: list[int], runs: int, ec2) -> int:
    print(f"moto server {os.environ['AWS_ENDPOINT_URL']}, {INSTANCE_TYPE} in {REGION}")
    print("up = cloud part only (check, placements, prepare, list, create + wait running);")
    print("     SSH wait and bootstrap are out of scope and not measured")
    print("down = _teardown: list, terminate + wait terminated, list, cleanup\n")

    # warm-up: moto builds the region's backend (AMIs, default VPC) on first use
    down("warmup", "warmup-0000")
    up("warmup", "warmup-0000", 1)
    down("warmup", "warmup-0000")

    results: dict[int, list[tuple[Phase, Phase]]] = {n: [] for n in sizes}
    left: dict[int, list[dict]] = {n: [] for n in sizes}
    created: dict[int, list[int]] = {n: [] for n in sizes}
    for r in range(runs):
        order = sizes[r % len(sizes) :] + sizes[: r % len(sizes)]
        for n in order:
            name = f"bench{n}"
            uid = f"{name}-r{r}"
            pu, nodes = up(name, uid, n)
            created[n].append(len(nodes))
            pd = down(name, uid)
            results[n].append((pu, pd))
            left[n].append(leftovers(ec2, uid))
    boto3_s = import_boto3_s(max(3, runs))

    first = {n: results[n][0] for n in sizes}
    ops = sorted({op for n in sizes for ph in first[n] for op in ph.calls})

    print(f"baseline: python -c 'import boto3'  {boto3_s:.3f} s (median of {max(3, runs)})\n")
    head = (
        f"{'N':>4} {'op':<5} {'wall s':>7} {'x boto3':>7} {'client s':>8} {'calls':>5} "
        f"{'RunInst':>7} {'waiter':>6} {'HTTP':>5}  per-operation calls"
    )
    print(head)
    print("-" * len(head))
    for n in sizes:
        for label, i in (("up", 0), ("down", 1)):
            ph = first[n][i]
            wall = statistics.median(res[i].wall for res in results[n])
            client_s = statistics.median(res[i].client_s for res in results[n])
            per_op = " ".join(f"{op}={c}" for op, c in sorted(ph.calls.items()))
            print(
                f"{n:>4} {label:<5} {wall:>7.3f} {wall / boto3_s:>7.2f} {client_s:>8.3f} "
                f"{ph.total:>5} {ph.calls['RunInstances']:>7} {ph.waiter_polls:>6} "
                f"{ph.attempts:>5}  {per_op}"
            )
    print(f"(wall s: median of {runs}; calls: waiter polls apart; HTTP: attempts incl. all)\n")

    cols = [f"{label} N={n}" for n in sizes for label in ("up", "down")]
    width = max(len(op) for op in [*ops, WAITER])
    print(f"{'operation':<{width}} " + " ".join(f"{c:>10}" for c in cols))
    for op in [*ops, WAITER]:
        cells = []
        for n in sizes:
            for ph in first[n]:
                cells.append(ph.waiter_polls if op == WAITER else ph.calls.get(op, 0))
        print(f"{op:<{width}} " + " ".join(f"{c:>10}" for c in cells))
    print()

    for n in sizes:
        print(f"left in moto after down, N={n}: {left[n][-1]}")
    print()

    checks: list[tuple[str, bool]] = []
    for n in sizes:
        ups = [res[0] for res in results[n]]
        downs = [res[1] for res in results[n]]
        checks.append(
            (
                f"N={n}: RunInstances == 1 per up",
                all(u.calls["RunInstances"] == 1 for u in ups),
            )
        )
        checks.append((f"N={n}: up returned {n} node(s)", all(c == n for c in created[n])))
        checks.append(
            (
                f"N={n}: after down 0 non-terminated instances, no SG/key pair/placement group",
                all(
                    d["non-terminated"] == 0
                    and d["non-terminated (all of moto)"] == 0
                    and d["security groups"] == d["key pairs"] == d["placement groups"] == 0
                    for d in left[n]
                ),
            )
        )
        checks.append(
            (
                f"N={n}: the same calls on every run",
                len({u.signature() for u in ups}) == 1 and len({d.signature() for d in downs}) == 1,
            )
        )
        checks.append(
            (
                f"N={n}: one waiter poll per wait (up 1, down 1)",
                all(u.waiter_polls == 1 for u in ups) and all(d.waiter_polls == 1 for d in downs),
            )
        )
        checks.append(
            (
                f"N={n}: no retries (HTTP attempts == calls + waiter polls)",
                all(ph.attempts == ph.total + ph.waiter_polls for res in results[n] for ph in res),
            )
        )
    multi = [n for n in sizes if n > 1]
    for i, label in ((0, "up"), (1, "down")):
        if len(multi) > 1:
            totals = {n: first[n][i].total for n in multi}
            checks.append(
                (
                    f"{label}: calls do not grow with N ({totals} for N >= 2)",
                    len(set(totals.values())) == 1
                    and all(first[n][i].calls == first[multi[0]][i].calls for n in multi),
                )
            )
        if 1 in sizes and multi:
            one, many = first[1][i].calls, first[multi[0]][i].calls
            extra = many - one
            checks.append(
                (
                    f"{label}: N=1 differs from N={multi[0]} only by placement-group calls "
                    f"({first[1][i].total} vs {first[multi[0]][i].total}: "
                    f"{dict(extra) or 'none'})",
                    not (one - many) and set(extra) <= PG_OPS,
                )
            )

    ok = all(passed for _, passed in checks)
    for what, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {what}")
    print(f"\n{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
