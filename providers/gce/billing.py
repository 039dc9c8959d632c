"""Prices of GCE GPU machines from the Cloud Billing Catalog API: on demand for
`mlcloud catalog refresh --provider gce`, on demand or Spot for live offers
(mlcloud/spec/offers.py).

GCE prices a machine by its parts: vCPUs and memory at its family's rate (A2, A3, G2, N1) and
each GPU at its model's, per region. A machine's figure is their sum (a3's bundled local SSD is
not included), from the shapes the catalog lists."""

from __future__ import annotations

import os
import re
from typing import Any

from mlcloud.providers.base import ProviderError

ENDPOINT_ENV = "MLCLOUD_GCE_BILLING_ENDPOINT"
ENDPOINT = "https://cloudbilling.googleapis.com"
COMPUTE_SERVICE = "6F81-5844-456A"  # Compute Engine's id in the Billing Catalog
# The catalog's GPU models as the Billing Catalog's SKU descriptions name them.
GPU_SKUS = {
    "T4": "T4",
    "V100": "V100",
    "P100": "P100",
    "P4": "P4",
    "L4": "L4",
    "A100": "A100",
    "A100-80GB": "A100 80GB",
    "H100": "H100 80GB",
    "H100-MEGA": "H100 80GB Mega",
    "H200": "H200 141GB",
}


def on_demand(credentials: Any, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """(machine type, region) -> USD/h, for those whose parts all have a price."""
    return machines(credentials, pairs, spot=False)


def machines(
    credentials: Any, pairs: list[tuple[str, str]], *, spot: bool
) -> dict[tuple[str, str], float]:
    """(machine type, region) -> USD/h on demand or Spot (GCE prices Spot per region, the
    same in each of its zones), for those whose parts all have a price."""
    from mlcloud.spec import catalog

    shapes = {(o.instance_type, o.region): o for o in catalog.load() if o.provider == "gce"}
    skus = list(_skus(credentials))
    usage = "Preemptible" if spot else "OnDemand"
    out = {}
    for itype, region in pairs:
        o = shapes.get((itype, region))
        family = itype.split("-", 1)[0].upper()
        gpu = GPU_SKUS.get(o.gpu_model) if o else None
        if o is None or gpu is None:
            continue
        core = _rate(skus, rf"{family} (Predefined )?Instance Core", region, usage)
        ram = _rate(skus, rf"{family} (Predefined )?Instance Ram", region, usage)
        card = _rate(skus, rf"Nvidia (Tesla )?{re.escape(gpu)} GPU", region, usage)
        if None not in (core, ram, card):
            out[(itype, region)] = o.vcpus * core + o.ram_gib * ram + o.gpu_count * card
    return out


def _rate(skus: list[dict], what: str, region: str, usage: str) -> float | None:
    """The unit price of the SKU described as `what running in ...` in region, of the usage
    type (OnDemand, or Preemptible: Spot, whose descriptions add "Spot Preemptible" before
    the part, or "attached to Spot Preemptible VMs" after a GPU's)."""
    pattern = re.compile(
        rf"(Spot Preemptible )?{what}( attached to Spot Preemptible VMs)? running in "
    )
    for s in skus:
        if (
            pattern.match(s.get("description", ""))
            and s.get("category", {}).get("usageType") == usage
            and region in s.get("serviceRegions", [])
        ):
            rates = s["pricingInfo"][0]["pricingExpression"]["tieredRates"]
            price = rates[-1]["unitPrice"]
            return int(price.get("units") or 0) + price.get("nanos", 0) / 1e9
    return None


def _skus(credentials: Any):
    """Every Compute Engine SKU, page by page."""
    from google.auth.exceptions import GoogleAuthError
    from google.auth.transport.requests import AuthorizedSession

    base = os.environ.get(ENDPOINT_ENV) or ENDPOINT
    url = f"{base.rstrip('/')}/v1/services/{COMPUTE_SERVICE}/skus"
    session = AuthorizedSession(credentials)
    params = {"currencyCode": "USD", "pageSize": 5000}
    try:
        while True:
            r = session.get(url, params=params, timeout=(5, 60))
            if r.status_code != 200:
                raise ProviderError(
                    f"Cloud Billing Catalog API answered {r.status_code} "
                    f"({r.text[:120].strip() or 'no message'})"
                )
            page = r.json()
            yield from page.get("skus", [])
            if not page.get("nextPageToken"):
                return
            params["pageToken"] = page["nextPageToken"]
    except (OSError, ValueError, GoogleAuthError) as e:
        raise ProviderError(f"cannot reach the Cloud Billing Catalog API at {base}: {e}") from e
    finally:
        session.close()
