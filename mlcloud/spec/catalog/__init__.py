"""The GPU catalog: which instance types carry which GPUs, where, and at what price.

A dated CSV ships in the package (built from public price lists, sources named in its header);
`mlcloud catalog refresh` writes fresher rows beside it, in $MLCLOUD_HOME, which then win for
their provider. Nothing here touches the network.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass
from pathlib import Path

from mlcloud.errors import UsageError
from mlcloud.spec.task import GpuSpec

SHIPPED = Path(__file__).parent / "data" / "gpu_offers.csv"
# The price lists name clouds (gcp); offers name the provider that serves them (gce).
PROVIDER_OF_CLOUD = {"gcp": "gce"}
COLUMNS = [
    "provider",
    "instance_type",
    "gpu_model",
    "gpu_count",
    "gpu_memory_gib",
    "vcpus",
    "ram_gib",
    "region",
    "zones",
    "on_demand_usd_h",
    "spot_usd_h",
    "note",
]


@dataclass(frozen=True)
class Offer:
    provider: str
    instance_type: str
    gpu_model: str
    gpu_count: int
    gpu_memory_gib: float
    vcpus: float
    ram_gib: float
    region: str
    zones: tuple[str, ...]
    on_demand: float
    spot: float | None
    note: str

    def price(self, spot: bool) -> float | None:
        return self.spot if spot else self.on_demand


def refreshed_path(provider: str) -> Path:
    from mlcloud.state import paths

    return paths.home() / "catalog" / f"{provider}.csv"


def read(path: Path) -> list[Offer]:
    with open(path, newline="") as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [
            Offer(
                PROVIDER_OF_CLOUD.get(r["provider"], r["provider"]),
                r["instance_type"],
                r["gpu_model"],
                int(r["gpu_count"]),
                float(r["gpu_memory_gib"]),
                float(r["vcpus"]),
                float(r["ram_gib"]),
                r["region"],
                tuple(z for z in r["zones"].split(";") if z),
                float(r["on_demand_usd_h"]),
                float(r["spot_usd_h"]) if r["spot_usd_h"] else None,
                r["note"],
            )
            for r in rows
        ]


def header(path: Path = SHIPPED) -> list[str]:
    """The comment lines at the top: the date and sources of the figures."""
    with open(path) as f:
        return [line[1:].strip() for line in f if line.startswith("#")]


def built() -> str:
    """The header line that says when and from what the shipped catalog was built."""
    lines = header()
    return next((line for line in lines if line.startswith("Built on")), SHIPPED.name)


def load() -> list[Offer]:
    """Shipped offers, with any provider's refreshed rows in place of its shipped ones."""
    offers = read(SHIPPED)
    for provider in sorted({o.provider for o in offers}):
        fresh = refreshed_path(provider)
        if fresh.exists():
            offers = [o for o in offers if o.provider != provider] + read(fresh)
    return offers


def models(offers: list[Offer]) -> list[str]:
    return sorted({o.gpu_model for o in offers})


def find(
    offers: list[Offer],
    gpus: GpuSpec | None = None,
    *,
    provider: str | None = None,
    region: str | None = None,
    spot: bool = False,
    max_price: float | None = None,
    instance_type: str | None = None,
) -> list[Offer]:
    """Offers meeting every constraint, cheapest first; an impossible ask is a UsageError
    that names the constraint which excluded the last candidates."""
    what = str(gpus) if gpus else instance_type or "any GPU"
    pool = offers
    if gpus is not None:
        pool = [o for o in pool if o.gpu_model.lower() == gpus.model.lower()]
        if not pool:
            close = difflib.get_close_matches(gpus.model.upper(), models(offers), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown GPU {gpus.model!r}{hint} (`mlcloud gpus` lists them)")
        counts = sorted({o.gpu_count for o in pool})
        pool = [o for o in pool if o.gpu_count == gpus.count]
        if not pool:
            raise UsageError(
                f"no machine has {gpus.count} x {gpus.model}; it comes "
                f"{', '.join(map(str, counts))} per machine"
            )
    if instance_type:
        pool = [o for o in pool if o.instance_type == instance_type]
        if not pool:
            raise UsageError(f"{instance_type} is not in the catalog for {what}")
    steps = [
        (provider, lambda o: o.provider == provider, f"on {provider}"),
        (region, lambda o: o.region == region, f"in {region}"),
        (spot or None, lambda o: o.spot is not None, "with a spot price"),
    ]
    applied = []
    for value, keep, label in steps:
        if value is None:
            continue
        narrowed = [o for o in pool if keep(o)]
        if not narrowed:
            where = sorted({o.region if label.startswith("in") else o.provider for o in pool})
            raise UsageError(
                f"no {what} offer {' '.join(applied + [label])}; it is offered "
                + ("in " if label.startswith("in") else "on ")
                + ", ".join(where[:8])
                + (" ..." if len(where) > 8 else "")
            )
        pool = narrowed
        applied.append(label)
    pool = sorted(pool, key=lambda o: (o.price(spot) or 0.0, o.provider, o.region))
    if max_price is not None:
        cheapest = pool[0].price(spot) or 0.0
        pool = [o for o in pool if (o.price(spot) or 0.0) <= max_price]
        if not pool:
            raise UsageError(
                f"the cheapest {'spot ' if spot else ''}{what} offer "
                f"{' '.join(applied)} costs ${cheapest:.2f}/h, above --max-price "
                f"${max_price:.2f}".replace("  ", " ")
            )
    return pool


def lookup(offers: list[Offer], provider: str, instance_type: str, region: str) -> Offer | None:
    for o in offers:
        if (o.provider, o.instance_type, o.region) == (provider, instance_type, region):
            return o
    return None
