"""What every project of the fake sees: its zones and regions (the shipped catalog's GCP zones
and common ones, so any zone the provider takes from the catalog exists) and the public images
(Deep Learning VM families, an older deprecated image and the newest in each)."""

from __future__ import annotations

import csv
from pathlib import Path

from .gce_model import API, new_id, now_rfc3339, region_of

CATALOG = (
    Path(__file__).resolve().parents[2] / "mlcloud" / "spec" / "catalog" / "data" / "gpu_offers.csv"
)
# zones beyond the catalog's GPU zones that every project sees
BASE_ZONES = (
    "us-central1-a us-central1-b us-central1-c us-central1-f us-east1-b us-east1-c us-east1-d "
    "us-east4-a us-east4-b us-east4-c us-west1-a us-west1-b us-west1-c europe-west4-a "
    "europe-west4-b europe-west4-c asia-east1-a asia-east1-b asia-east1-c"
).split()


def known_zones() -> list[str]:
    """The catalog's GCP zones and common ones: any zone the catalog offers exists here."""
    zones = set(BASE_ZONES)
    if CATALOG.exists():
        with CATALOG.open() as f:
            rows = csv.DictReader(line for line in f if not line.startswith("#"))
            for row in rows:
                if row.get("provider") == "gcp":
                    zones.update(z for z in (row.get("zones") or "").split(";") if z)
    return sorted(zones)


def zone_resource(project: str, zone: str, zid: str) -> dict:
    region = region_of(zone)
    return {
        "kind": "compute#zone",
        "id": zid,
        "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
        "name": zone,
        "description": zone,
        "status": "UP",
        "region": f"{API}/projects/{project}/regions/{region}",
        "selfLink": f"{API}/projects/{project}/zones/{zone}",
        "availableCpuPlatforms": ["Intel Cascade Lake", "Intel Ice Lake", "AMD Milan"],
        "supportsPzs": False,
    }


def region_resource(project: str, region: str, zones: list[str], rid: str) -> dict:
    return {
        "kind": "compute#region",
        "id": rid,
        "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
        "name": region,
        "description": region,
        "status": "UP",
        "zones": [f"{API}/projects/{project}/zones/{z}" for z in zones],
        "selfLink": f"{API}/projects/{project}/regions/{region}",
        "supportsPzs": False,
    }


def image_resource(project: str, name: str, family: str, disk_gb: int, deprecated=False) -> dict:
    image = {
        "kind": "compute#image",
        "id": new_id(),
        "creationTimestamp": now_rfc3339(),
        "name": name,
        "description": f"{family} image",
        "sourceType": "RAW",
        "status": "READY",
        "archiveSizeBytes": str(disk_gb * 2**28),
        "diskSizeGb": str(disk_gb),
        "family": family,
        "selfLink": f"{API}/projects/{project}/global/images/{name}",
        "labelFingerprint": "42WmSpB8rSM=",
        "guestOsFeatures": [{"type": "UEFI_COMPATIBLE"}, {"type": "GVNIC"}],
        "storageLocations": ["us"],
        "architecture": "X86_64",
    }
    if deprecated:
        image["deprecated"] = {"state": "DEPRECATED"}
    return image


def public_images() -> list[dict]:
    """Deep Learning VM families (and two OS images): an older deprecated image and the newest."""
    dl = "deeplearning-platform-release"
    families = {
        (dl, "pytorch-latest-gpu", 50): (
            "pytorch-latest-gpu-v20260101",
            "pytorch-latest-gpu-v20261115",
        ),
        (dl, "pytorch-latest-cpu", 50): (
            "pytorch-latest-cpu-v20260101",
            "pytorch-latest-cpu-v20261115",
        ),
        (dl, "pytorch-2-7-cu128-ubuntu-2204-nvidia-570", 50): (
            "pytorch-2-7-cu128-ubuntu-2204-nvidia-570-v20260101",
            "pytorch-2-7-cu128-ubuntu-2204-nvidia-570-v20261115",
        ),
        (dl, "common-cu128-ubuntu-2204-nvidia-570", 50): (
            "common-cu128-ubuntu-2204-nvidia-570-v20260101",
            "common-cu128-ubuntu-2204-nvidia-570-v20261115",
        ),
        ("debian-cloud", "debian-12", 10): (
            "debian-12-bookworm-v20260101",
            "debian-12-bookworm-v20261110",
        ),
        ("ubuntu-os-cloud", "ubuntu-2204-lts", 10): (
            "ubuntu-2204-jammy-v20260101",
            "ubuntu-2204-jammy-v20261112",
        ),
    }
    out = []
    for (project, family, gb), (old, new) in families.items():
        out.append(image_resource(project, old, family, gb, deprecated=True))
        out.append(image_resource(project, new, family, gb))
    return out
