"""The Cloud Billing Catalog API's Compute Engine SKUs (`GET /v1/services/6F81-5844-456A/skus`),
made from the shipped catalog so a refresh against the fake lands near the shipped prices.

GCE prices a machine by parts: each family's vCPU and GiB of memory, and each GPU, per region,
on-demand and Spot (plus commitments, which a refresh must skip). The per-GPU price here is
what the catalog's smallest shape of that GPU leaves after its vCPUs and memory, so that shape
comes back exactly and the others close.
"""

from __future__ import annotations

import base64
import csv
import hashlib

from .gce_catalog import CATALOG
from .gce_model import ApiError, invalid

COMPUTE_SERVICE = "6F81-5844-456A"
# (vCPU-h, GiB-h) on-demand and Spot, per family; N1 as the catalog's notes give them
FAMILY_RATES = {
    "N1": ((0.031611, 0.004237), (0.00664, 0.00089)),
    "A2": ((0.031611, 0.004237), (0.00664, 0.00089)),
    "A3": ((0.02, 0.0025), (0.008, 0.001)),
    "G2": ((0.024988, 0.002927), (0.00999, 0.00117)),
}
GPU_NAMES = {
    "T4": "Nvidia Tesla T4",
    "V100": "Nvidia Tesla V100",
    "P100": "Nvidia Tesla P100",
    "P4": "Nvidia Tesla P4",
    "A100": "Nvidia Tesla A100",
    "A100-80GB": "Nvidia A100 80GB",
    "L4": "Nvidia L4",
    "H100": "Nvidia H100 80GB",
    "H100-MEGA": "Nvidia H100 80GB Mega",
    "H200": "Nvidia H200 141GB",
}


def _area(region: str) -> str:
    if region.startswith(("us-", "northamerica-", "southamerica-")):
        return "Americas"
    if region.startswith(("europe-", "me-", "africa-")):
        return "EMEA"
    return "APAC"


def _price(usd: float) -> dict:
    units = int(usd)
    return {"currencyCode": "USD", "units": str(units), "nanos": round((usd - units) * 1e9)}


def _sku(description: str, group: str, usage: str, region: str, usd: float, unit: str) -> dict:
    sku_id = hashlib.sha1(f"{description}|{usage}|{region}".encode()).hexdigest()[:12].upper()
    sku_id = f"{sku_id[:4]}-{sku_id[4:8]}-{sku_id[8:]}"
    gib = unit == "GiBy.h"
    return {
        "name": f"services/{COMPUTE_SERVICE}/skus/{sku_id}",
        "skuId": sku_id,
        "description": description,
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Compute",
            "resourceGroup": group,
            "usageType": usage,
        },
        "serviceRegions": [region],
        "pricingInfo": [
            {
                "summary": "",
                "pricingExpression": {
                    "usageUnit": unit,
                    "usageUnitDescription": "gibibyte hour" if gib else "hour",
                    "baseUnit": "By.s" if gib else "s",
                    "baseUnitDescription": "byte second" if gib else "second",
                    "baseUnitConversionFactor": 3865470566400 if gib else 3600,
                    "displayQuantity": 1,
                    "tieredRates": [{"startUsageAmount": 0, "unitPrice": _price(usd)}],
                },
                "currencyConversionRate": 1,
                "effectiveTime": "2026-11-27T00:00:00Z",
            }
        ],
        "serviceProviderName": "Google",
        "geoTaxonomy": {"type": "REGIONAL", "regions": [region]},
    }


def compute_skus() -> list[dict]:
    """Core, RAM and GPU SKUs per region of the catalog: OnDemand, Preemptible (Spot) and a
    Commit1Yr that a price refresh must not take for the on-demand rate."""
    with CATALOG.open() as f:
        rows = [
            r
            for r in csv.DictReader(line for line in f if not line.startswith("#"))
            if r["provider"] == "gcp"
        ]
    parts: dict[tuple, float] = {}  # (description, group, usage, region, unit) -> USD
    smallest: dict[tuple[str, str], dict] = {}
    for r in rows:
        family = r["instance_type"].split("-", 1)[0].upper()
        if family not in FAMILY_RATES:
            continue
        key = (r["gpu_model"], r["region"])
        if key not in smallest or int(r["gpu_count"]) < int(smallest[key]["gpu_count"]):
            smallest[key] = r
        area = _area(r["region"])
        core = f"{family} {'Predefined ' if family == 'N1' else ''}Instance Core"
        ram = f"{family} {'Predefined ' if family == 'N1' else ''}Instance Ram"
        for usage, (c, m), prefix in (
            ("OnDemand", FAMILY_RATES[family][0], ""),
            ("Preemptible", FAMILY_RATES[family][1], "Spot Preemptible "),
        ):
            parts[(f"{prefix}{core} running in {area}", family, usage, r["region"], "h")] = c
            parts[(f"{prefix}{ram} running in {area}", family, usage, r["region"], "GiBy.h")] = m
        commit = f"Commitment v1: {core} in {area} for 1 Year"
        parts[(commit, family, "Commit1Yr", r["region"], "h")] = FAMILY_RATES[family][0][0] * 0.63
    for (model, region), r in smallest.items():
        family = r["instance_type"].split("-", 1)[0].upper()
        gpus, cpus, ram = int(r["gpu_count"]), float(r["vcpus"]), float(r["ram_gib"])
        name = GPU_NAMES.get(model)
        if not name:
            continue
        area = _area(region)
        for usage, col, (c, m), prefix in (
            ("OnDemand", "on_demand_usd_h", FAMILY_RATES[family][0], ""),
            ("Preemptible", "spot_usd_h", FAMILY_RATES[family][1], "Spot Preemptible "),
        ):
            if not r[col]:
                continue
            per_gpu = max((float(r[col]) - cpus * c - ram * m) / gpus, 0.01)
            parts[(f"{prefix}{name} GPU running in {area}", "GPU", usage, region, "h")] = per_gpu
    return [_sku(d, g, u, region, usd, unit) for (d, g, u, region, unit), usd in parts.items()]


def set_unit_price(skus: list[dict], region: str, part: str, usd: float, usage: str) -> int:
    """Give the matching SKUs (see GceFake.set_price) a new unit price; how many matched."""
    changed = 0
    for s in skus:
        if (
            part in s["description"]
            and s["category"]["usageType"] == usage
            and region in s["serviceRegions"]
        ):
            for rate in s["pricingInfo"][0]["pricingExpression"]["tieredRates"]:
                rate["unitPrice"] = _price(usd)
            changed += 1
    return changed


def page_of_skus(skus: list[dict], service: str, query: dict) -> dict:
    """One page (pageSize up to 5000, default 5000), as services.skus.list answers."""
    if service != COMPUTE_SERVICE:
        raise ApiError(404, "notFound", f"Service {service} not found.", status="NOT_FOUND")
    if query.get("currencyCode", "USD") != "USD":
        raise invalid("currencyCode", query["currencyCode"], "Only USD in this fake.")
    size = int(query.get("pageSize") or 5000)
    if not 0 < size <= 5000:
        raise invalid("pageSize", size, "Must be between 1 and 5000.")
    start = (
        int(base64.urlsafe_b64decode(query["pageToken"]).decode()) if query.get("pageToken") else 0
    )
    more = start + size < len(skus)
    token = base64.urlsafe_b64encode(str(start + size).encode()).decode() if more else ""
    return {"skus": skus[start : start + size], "nextPageToken": token}
