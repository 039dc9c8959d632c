"""Build the GPU catalog shipped in the package from the project's shared price snapshot.

    python -m mlcloud.catalog.snapshot PRICES_DIR OUT_CSV

PRICES_DIR holds ``aws-gpu-vms.csv`` and ``gcp-gpu-vms.csv`` (rows copied from
skypilot-org/skypilot-catalog, see its SOURCE.md). The output is one row per
(provider, instance type, region) with the whole machine's on-demand price and the median of
the zones' sampled spot prices, preceded by ``# `` comments that carry the date, the sources and
the corrections applied. The build is deterministic: same input, same bytes. Stdlib only.
"""

from __future__ import annotations

import ast
import csv
import io
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mlcloud.spec.catalog import COLUMNS

BUILD_DATE = "2026-11-27"
AWS_SOURCE = (
    "skypilot-org/skypilot-catalog catalogs/v7/aws/vms.csv "
    "commit 001367d22a0033fac286a8c71aeac7109e431bcb"
)
GCP_SOURCE = (
    "skypilot-org/skypilot-catalog catalogs/v7/gcp/vms.csv "
    "commit 017e2502fb63c7a28757acd94002b2d6099d3e3d"
)
AWS_FILE = "aws-gpu-vms.csv"
GCP_FILE = "gcp-gpu-vms.csv"

PRICE_DECIMALS = 6

# --- AWS ---------------------------------------------------------------------------------------

AWS_FAMILIES = ("p5", "p5e", "p5en", "p4d", "p4de", "p3", "p3dn", "g6e", "g6", "g5", "g4dn", "gr6")
# p4de.24xlarge is 8 x A100 80 GB; some source rows name its GPU "A100" in GpuInfo.
AWS_GPU_MODEL = {"p4de.24xlarge": "A100-80GB"}
# June 2025: AWS cut on-demand prices of its NVIDIA GPU instances; the snapshot predates it.
# Published post-cut us-east-1 prices; each region is scaled by (after / snapshot us-east-1).
CUT_REGION = "us-east-1"
CUT_AFTER = {"p5.48xlarge": 55.04, "p4d.24xlarge": 21.96, "p4de.24xlarge": 27.447}
# Types cut too but with no published figure here: the ratio of another type, as an estimate.
CUT_ESTIMATED_FROM = {"p5en.48xlarge": "p5.48xlarge"}

# --- GCP ---------------------------------------------------------------------------------------

GCP_VM_GPUS: dict[str, tuple[str, int]] = {
    **{f"a2-highgpu-{n}g": ("A100", n) for n in (1, 2, 4, 8)},
    "a2-megagpu-16g": ("A100", 16),
    **{f"a2-ultragpu-{n}g": ("A100-80GB", n) for n in (1, 2, 4, 8)},
    **{f"a3-highgpu-{n}g": ("H100", n) for n in (1, 2, 4, 8)},
    "a3-megagpu-8g": ("H100-MEGA", 8),
    "a3-ultragpu-8g": ("H200", 8),
    "a3-edgegpu-8g": ("H100", 8),
    "a4-highgpu-8g": ("B200", 8),
    **{f"g2-standard-{n}": ("L4", 1) for n in (4, 8, 12, 16, 32)},
    "g2-standard-24": ("L4", 2),
    "g2-standard-48": ("L4", 4),
    "g2-standard-96": ("L4", 8),
}
GCP_SKIP_SUFFIX = "-nolssd"
# n1 GPUs: the snapshot has their GPU rows but no n1 VM rows. The VM is priced from GCP's
# published us-central1 N1 predefined rates (USD per vCPU-hour, per GiB-hour).
N1_RATES = {"on_demand": (0.031611, 0.004237), "spot": (0.00664, 0.00089)}
N1_MACHINES = {"n1-standard-8": (8, 30), "n1-standard-16": (16, 60)}
N1_OFFERS = (("n1-standard-8", 1), ("n1-standard-16", 2), ("n1-standard-16", 4))
N1_GPUS = ("T4", "V100", "P100", "P4")
N1_NOTE = "n1 VM priced at us-central1 rates"


@dataclass
class _Offer:
    provider: str
    instance_type: str
    gpu_model: str
    gpu_count: int
    gpu_memory_gib: float
    vcpus: float
    ram_gib: float
    region: str
    zones: set[str] = field(default_factory=set)
    on_demand: list[float] = field(default_factory=list)
    spot_by_zone: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    spot: float | None = None

    def add(self, zone: str, on_demand: float, spot: float | None) -> None:
        """One zone's whole-machine prices (spot where the snapshot sampled one)."""
        self.zones.add(zone)
        self.on_demand.append(on_demand)
        if spot is not None:
            self.spot_by_zone.setdefault(zone, []).append(spot)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _float(text: str) -> float | None:
    text = text.strip()
    return float(text) if text else None


def _num(x: float) -> str:
    """Counts and sizes: integers without a decimal point, else up to 2 decimals."""
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _price(x: float) -> str:
    return f"{x:.{PRICE_DECIMALS}f}"


def _natural(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def _family(instance_type: str) -> str:
    return instance_type.split(".", 1)[0]


# --- AWS ---------------------------------------------------------------------------------------


def _aws(rows: list[dict[str, str]], left_out: list[str]) -> tuple[list[_Offer], list[str]]:
    offers: dict[tuple[str, str], _Offer] = {}
    no_price: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        itype = r["InstanceType"]
        if _family(itype) not in AWS_FAMILIES:
            continue
        price = _float(r["Price"])
        if price is None:
            no_price[itype].add(r["Region"])
            continue
        key = (itype, r["Region"])
        if key not in offers:
            info = ast.literal_eval(r["GpuInfo"])
            mib = info["Gpus"][0]["MemoryInfo"]["SizeInMiB"]
            offers[key] = _Offer(
                provider="aws",
                instance_type=itype,
                gpu_model=AWS_GPU_MODEL.get(itype, r["AcceleratorName"]),
                gpu_count=int(float(r["AcceleratorCount"])),
                gpu_memory_gib=round(mib / 1024, 2),
                vcpus=float(r["vCPUs"]),
                ram_gib=float(r["MemoryGiB"]),
                region=r["Region"],
            )
        offers[key].add(r["AvailabilityZone"], price, _float(r["SpotPrice"]))
    for itype in sorted(no_price, key=_natural):
        if any(o.instance_type == itype for o in offers.values()):
            continue
        left_out.append(
            f"aws {itype}: no on-demand price in the snapshot (in "
            f"{len(no_price[itype])} regions), and none can be derived from it; left out"
        )
    return list(offers.values()), _apply_june_2025_cut(offers)


def _apply_june_2025_cut(offers: dict[tuple[str, str], _Offer]) -> list[str]:
    def before(itype: str) -> float | None:
        o = offers.get((itype, CUT_REGION))
        return min(o.on_demand) if o else None

    ratios: dict[str, tuple[float, str]] = {}
    comments = []
    for itype, after in CUT_AFTER.items():
        was = before(itype)
        if was is None:
            raise ValueError(f"{itype}: no {CUT_REGION} price in the snapshot to compute the cut")
        ratio = after / was
        ratios[itype] = (ratio, f"june-2025 cut applied (x {ratio:.4f})")
        comments.append(
            f"{itype}: {CUT_REGION} {was} -> {after} USD/h published after the June 2025 "
            f"cut; every region's on-demand price x {ratio:.6f}"
        )
    for itype, source in CUT_ESTIMATED_FROM.items():
        was = before(itype)
        if was is None:
            comments.append(f"{itype}: no {CUT_REGION} price in the snapshot; not adjusted")
            continue
        ratio = ratios[source][0]
        ratios[itype] = (
            ratio,
            f"june-2025 cut estimated (x {ratio:.4f}): ratio of {_family(source)} applied; "
            "refresh for the real figure",
        )
        comments.append(
            f"{itype}: estimate - {CUT_REGION} {was} USD/h x {ratio:.6f} (the {source} "
            f"ratio; no published post-cut figure here) = {was * ratio:.2f}; refresh for "
            "the real figure"
        )
    for (itype, _region), offer in offers.items():
        if itype in ratios:
            ratio, note = ratios[itype]
            offer.on_demand = [p * ratio for p in offer.on_demand]
            offer.notes.append(note)
    return comments


# --- GCP ---------------------------------------------------------------------------------------


def _gcp(rows: list[dict[str, str]], left_out: list[str]) -> tuple[list[_Offer], list[str]]:
    gpu_rows: dict[tuple[str, int, str], dict[str, str]] = {}
    gpu_mem: dict[str, float] = {}
    vm_rows = []
    for r in rows:
        if r["InstanceType"]:
            vm_rows.append(r)
            continue
        name, count = r["AcceleratorName"], int(float(r["AcceleratorCount"]))
        key = (name, count, r["AvailabilityZone"])
        if key in gpu_rows:
            raise ValueError(f"gcp: duplicate GPU row {key}")
        gpu_rows[key] = r
        info = ast.literal_eval(r["GpuInfo"])
        gpu_mem[name] = round(info["Gpus"][0]["MemoryInfo"]["SizeInMiB"] / 1024, 2)

    offers: dict[tuple[str, str], _Offer] = {}
    skipped_zones: dict[str, set[str]] = defaultdict(set)
    unmapped = sorted(
        {
            r["InstanceType"]
            for r in vm_rows
            if r["InstanceType"] not in GCP_VM_GPUS
            and not r["InstanceType"].endswith(GCP_SKIP_SUFFIX)
        }
    )
    if unmapped:
        raise ValueError(f"gcp: VM types with no GPU mapping: {', '.join(unmapped)}")
    for r in vm_rows:
        itype = r["InstanceType"]
        if itype.endswith(GCP_SKIP_SUFFIX):
            continue
        gpu, count = GCP_VM_GPUS[itype]
        zone = r["AvailabilityZone"]
        g = gpu_rows.get((gpu, count, zone))
        if g is None:
            skipped_zones[itype].add(zone)
            continue
        vm_price, gpu_price = _float(r["Price"]), _float(g["Price"])
        if vm_price is None or gpu_price is None:
            skipped_zones[itype].add(zone)
            continue
        vm = (float(r["vCPUs"]), float(r["MemoryGiB"]))
        offer = _gcp_offer(offers, itype, r["Region"], (gpu, count, gpu_mem[gpu]), vm)
        vm_spot, gpu_spot = _float(r["SpotPrice"]), _float(g["SpotPrice"])
        both = vm_spot is not None and gpu_spot is not None
        offer.add(zone, vm_price + gpu_price, vm_spot + gpu_spot if both else None)

    for itype in sorted(skipped_zones, key=_natural):
        zones = sorted(skipped_zones[itype])
        gpu, count = GCP_VM_GPUS[itype]
        left_out.append(
            f"gcp {itype}: zone(s) {', '.join(zones)} skipped - no {gpu} x {count} GPU row "
            "with a price there"
        )
    shipped = {o.instance_type for o in offers.values()}
    for itype, (gpu, count) in GCP_VM_GPUS.items():
        if itype not in shipped:
            have = {z for (n, c, z) in gpu_rows if (n, c) == (gpu, count)}
            if have:
                left_out.append(
                    f"gcp {itype}: {gpu} x {count} GPU rows exist ({len(have)} zones) but the "
                    "snapshot has no VM row for the machine, so no full machine price; left out"
                )

    n1_offers = _gcp_n1(gpu_rows, gpu_mem)
    comments = [
        "gcp: full machine price = VM row + GPU row (same zone, GPU model and count), "
        "on-demand and spot alike; -nolssd variants not shipped",
        f"gcp n1: n1-standard-8 + 1 GPU and n1-standard-16 + 2 or 4 GPUs ({', '.join(N1_GPUS)}) "
        "wherever the snapshot has the GPU row; the n1 VM is priced at GCP's published "
        f"us-central1 N1 rates in every region (on-demand {N1_RATES['on_demand'][0]} per "
        f"vCPU-h + {N1_RATES['on_demand'][1]} per GiB-h; spot {N1_RATES['spot'][0]} + "
        f"{N1_RATES['spot'][1]}); instance_type is MACHINE+GPU:COUNT, "
        "the machine type is the part before '+'",
    ]
    return list(offers.values()) + n1_offers, comments


def _gcp_n1(
    gpu_rows: dict[tuple[str, int, str], dict[str, str]], gpu_mem: dict[str, float]
) -> list[_Offer]:
    offers: dict[tuple[str, str], _Offer] = {}
    for machine, count in N1_OFFERS:
        vcpus, ram = N1_MACHINES[machine]
        vm_od = vcpus * N1_RATES["on_demand"][0] + ram * N1_RATES["on_demand"][1]
        vm_spot = vcpus * N1_RATES["spot"][0] + ram * N1_RATES["spot"][1]
        for (gpu, n, zone), g in gpu_rows.items():
            if gpu not in N1_GPUS or n != count:
                continue
            gpu_price = _float(g["Price"])
            if gpu_price is None:
                continue
            itype = f"{machine}+{gpu}:{count}"
            gpus = (gpu, count, gpu_mem[gpu])
            offer = _gcp_offer(offers, itype, g["Region"], gpus, (vcpus, ram), (N1_NOTE,))
            gpu_spot = _float(g["SpotPrice"])
            offer.add(zone, vm_od + gpu_price, None if gpu_spot is None else vm_spot + gpu_spot)
    return list(offers.values())


def _gcp_offer(
    offers: dict[tuple[str, str], _Offer],
    itype: str,
    region: str,
    gpu: tuple[str, int, float],
    vm: tuple[float, float],
    notes: tuple[str, ...] = (),
) -> _Offer:
    """The offer of itype in region, made on the first of its zones: gpu is (model, count,
    GiB each), vm (vCPUs, RAM GiB)."""
    (model, count, memory), (vcpus, ram_gib) = gpu, vm
    return offers.setdefault(
        (itype, region),
        _Offer("gcp", itype, model, count, memory, vcpus, ram_gib, region, notes=list(notes)),
    )


# --- assembly ----------------------------------------------------------------------------------


def _finish(offer: _Offer) -> None:
    """Regional figures: cheapest zone's on-demand, median of the zones' spot samples."""
    zone_spots = [min(v) for v in offer.spot_by_zone.values()]
    offer.spot = statistics.median(zone_spots) if zone_spots else None
    od = min(offer.on_demand)
    # compare at the shipped precision, so that capping and the check below agree
    if offer.spot is not None and round(offer.spot, PRICE_DECIMALS) > round(od, PRICE_DECIMALS):
        offer.notes.append("median spot sample above on-demand: spot capped at on-demand")
        offer.spot = od


def _check(offer: _Offer) -> None:
    where = f"{offer.provider} {offer.instance_type} {offer.region}"
    od = min(offer.on_demand) if offer.on_demand else 0.0
    if not od > 0:
        raise ValueError(f"{where}: on-demand price must be > 0, got {od}")
    if offer.spot is not None:
        if offer.spot <= 0:
            raise ValueError(f"{where}: spot price must be > 0, got {offer.spot}")
        if round(offer.spot, PRICE_DECIMALS) > round(od, PRICE_DECIMALS):
            raise ValueError(f"{where}: spot {offer.spot} above on-demand {od}")
    if offer.gpu_count < 1:
        raise ValueError(f"{where}: gpu_count must be >= 1, got {offer.gpu_count}")


def build(prices_dir: Path) -> str:
    """The shipped catalog CSV text (comments, header, rows) built from PRICES_DIR."""
    prices_dir = Path(prices_dir)
    left_out: list[str] = []
    aws_offers, cut_comments = _aws(_read(prices_dir / AWS_FILE), left_out)
    gcp_offers, gcp_comments = _gcp(_read(prices_dir / GCP_FILE), left_out)
    offers = aws_offers + gcp_offers
    seen: set[tuple[str, str, str]] = set()
    for o in offers:
        key = (o.provider, o.instance_type, o.region)
        if key in seen:
            raise ValueError(f"duplicate offer {key}")
        seen.add(key)
        _finish(o)
        _check(o)
    offers.sort(key=lambda o: (o.provider, _natural(o.instance_type), o.region))

    capped = sorted(
        {
            f"{o.provider} {o.instance_type}"
            for o in offers
            if any(n.startswith("median spot sample above") for n in o.notes)
        },
        key=_natural,
    )
    out = io.StringIO()
    lines = [
        "mlcloud GPU catalog: offers of AWS and GCP GPU instance types per region.",
        f"Built on {BUILD_DATE} from the project's shared price snapshot "
        "(shared/data/prices, see its SOURCE.md) of:",
        f"  AWS: {AWS_SOURCE}",
        f"  GCP: {GCP_SOURCE}",
        "Public list prices in USD per hour as of that date, not quotes; they may be out of "
        "date. Refresh with `mlcloud catalog refresh`.",
        "on_demand_usd_h: the whole machine (all its GPUs) in the region (cheapest zone). "
        "spot_usd_h: median of the zones' sampled spot prices (typical spot), empty if none "
        "was sampled. gpu_memory_gib: per GPU. zones: AWS AZ IDs, GCP zone names.",
        "Corrections applied:",
        *(f"  {c}" for c in cut_comments),
        "  aws spot prices are market samples and are not adjusted for the cut.",
        "  aws p4de.24xlarge: GPU named A100-80GB (8 x A100 80 GB; some source rows say A100).",
        *(f"  {c}" for c in gcp_comments),
        "  a median spot sample above on-demand is capped at on-demand (noted per row)"
        + (f": {', '.join(capped)}." if capped else "."),
        "Caveat: the source's GCP H100 and H100-MEGA GPU rows vary widely between regions "
        "(per H100: 4.20076 in us-central1, 9.79655 in us-east4); they are copied as published, "
        "so GCP a3 prices deserve a refresh before they are relied on.",
        "Left out:",
        *(f"  {c}" for c in left_out),
        "  gcp V100 x 8 GPU rows: n1 offers are shipped with 1, 2 and 4 GPUs only.",
    ]
    for line in lines:
        out.write(f"# {line}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for o in offers:
        writer.writerow(
            [
                o.provider,
                o.instance_type,
                o.gpu_model,
                o.gpu_count,
                _num(o.gpu_memory_gib),
                _num(o.vcpus),
                _num(o.ram_gib),
                o.region,
                ";".join(sorted(o.zones)),
                _price(min(o.on_demand)),
                "" if o.spot is None else _price(o.spot),
                "; ".join(o.notes),
            ]
        )
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m mlcloud.catalog.snapshot PRICES_DIR OUT_CSV", file=sys.stderr)
        return 2
    text = build(Path(args[0]))
    out = Path(args[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8", newline="")
    rows = sum(1 for line in text.splitlines() if line and not line.startswith("#")) - 1
    print(f"wrote {out}: {rows} offers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
