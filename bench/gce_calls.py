"""Compute API calls of the GCE provider's `up` and `down` for 1, 8 and 64 nodes.

Run from the repository root with the project's venv:

    .venv/bin/python bench/gce_calls.py [--sizes 1,8,64]

Starts the tests' fake Compute API on loopback (tests/fakes/gce_server.py) with a throwaway
service-account key, and drives GceProvider through the real google-cloud-compute client
exactly as the engine does (mlcloud/provision/lifecycle.py):

  up    check, placements, then for the first place prepare, list, create(N); SSH
        bootstrap is out of scope (not an API call);
  down  `_teardown`: list, terminate (waits until the VMs are gone), list (confirm), cleanup.

Each phase uses a fresh GceProvider (a fresh CLI process in real use). The fake's request log
counts every call, by kind (token requests are not API calls and are not counted). Listings
made while waiting (for RUNNING, for deletion) are shown apart: how many depends on how fast
VMs change state, not on N.

PASS needs, for every size: one bulkInsert per up, the same up calls for every N, N instance
deletions per down (GCE has no bulk delete) and the rest of down the same for every N, and the
fake empty after down. Exit code 1 on FAIL.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

KINDS = [
    ("bulkInsert", "POST", r"/instances/bulkInsert$"),
    ("instances.delete", "DELETE", r"/instances/[^/]+$"),
    ("instances.aggregatedList", "GET", r"/aggregated/instances$"),
    ("operations.wait", "POST", r"/operations/[^/]+/wait$"),
    ("firewalls.get", "GET", r"/global/firewalls/[^/]+$"),
    ("firewalls.insert", "POST", r"/global/firewalls$"),
    ("firewalls.delete", "DELETE", r"/global/firewalls/[^/]+$"),
    ("images.getFromFamily", "GET", r"/images/family/"),
    ("zones.list", "GET", r"/zones$"),
]


def kind_of(method: str, path: str) -> str:
    for kind, m, pattern in KINDS:
        if m == method and re.search(pattern, path):
            return kind
    return f"{method} {path}"


def counted(fake, fn) -> tuple[Counter, float]:
    fake.clear_calls()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    return Counter(kind_of(c.method, c.path) for c in fake.calls()), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,8,64")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from fakes.gce_server import DEFAULT_PROJECT, GceFake

    tmp = Path(tempfile.mkdtemp(prefix="mlcloud-bench-gce-"))
    os.environ.update(
        MLCLOUD_HOME=str(tmp / "home"),
        GOOGLE_APPLICATION_CREDENTIALS=str(tmp / "key.json"),
        GOOGLE_CLOUD_PROJECT=DEFAULT_PROJECT,
        CLOUDSDK_CONFIG=str(tmp / "gcloud"),
        NO_GCE_CHECK="true",
    )
    from mlcloud.providers.base import ClusterRef, ProvisionRequest, SshOptions
    from mlcloud.providers.gce.provider import GceProvider

    failures = []
    rows = []
    with GceFake(op_seconds=0.05) as fake:
        fake.write_credentials(str(tmp / "key.json"), DEFAULT_PROJECT)
        os.environ["MLCLOUD_GCE_API_ENDPOINT"] = fake.url
        for n in sizes:
            ref = ClusterRef(f"bench{n}", f"bench{n}-{n:08x}", "bench", "us-central1")
            req = ProvisionRequest(
                count=n,
                instance_type="n1-standard-8+T4:1",
                region="us-central1",
                ssh=SshOptions(allowed_cidrs=("127.0.0.1/32",)),
            )

            def up(ref=ref, req=req, n=n) -> None:
                p = GceProvider()
                p.check(req)
                region, zone = p.placements(req)[0]
                prepared = p.prepare(ref, ProvisionRequest(**{**req.__dict__, "zone": zone}))
                have = p.list(ref)
                made = p.create(ref, prepared.request, n - len(have))
                if len(made) != n:
                    failures.append(f"N={n}: up made {len(made)} nodes")

            def down(ref=ref) -> None:
                p = GceProvider()
                live = p.list(ref)
                p.terminate(ref, live)
                if p.list(ref):
                    failures.append(f"{ref.name}: nodes left after terminate")
                p.cleanup(ref)

            up_calls, up_wall = counted(fake, up)
            down_calls, down_wall = counted(fake, down)
            if not fake.is_empty():
                failures.append(f"N={n}: the fake is not empty after down")
            rows.append((n, up_calls, up_wall, down_calls, down_wall))

    print(f"{'N':>3}  {'up calls':>8}  {'up s':>5}  {'down calls':>10}  {'down s':>6}  detail")
    for n, uc, uw, dc, dw in rows:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(uc.items()))
        print(f"{n:>3}  {sum(uc.values()):>8}  {uw:5.2f}  {sum(dc.values()):>10}  {dw:6.2f}")
        print(f"     up:   {detail}")
        print(f"     down: {', '.join(f'{k} {v}' for k, v in sorted(dc.items()))}")
        if uc["bulkInsert"] != 1:
            failures.append(f"N={n}: {uc['bulkInsert']} bulkInserts")
        if dc["instances.delete"] != n:
            failures.append(f"N={n}: {dc['instances.delete']} deletions")

    def fixed(c: Counter, apart: tuple[str, ...]) -> Counter:
        return Counter({k: v for k, v in c.items() if k not in apart})

    waits = ("instances.aggregatedList",)  # polls while waiting: timing, not N
    if len({tuple(sorted(fixed(uc, waits).items())) for _, uc, *_ in rows}) != 1:
        failures.append("up calls differ between sizes")
    deletes = (*waits, "instances.delete")
    if len({tuple(sorted(fixed(dc, deletes).items())) for *_, dc, _ in rows}) != 1:
        failures.append("down calls (deletions and polls apart) differ between sizes")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
