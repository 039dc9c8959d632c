"""Compute API v1 resources as GCE returns them: URLs, errors, validation, request bodies.

Pure functions over JSON dicts (camelCase, int64 as strings), no server state. The rules
checked are GCE's (names, labels, tags, URL forms, GPUs need onHostMaintenance TERMINATE,
disk no smaller than its image, maxRunDuration needs a termination action), so a provider
that passes here sends what the real API accepts.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import secrets
import uuid
from datetime import datetime, timezone

# selfLinks name the real API, as GCE writes them; nothing here ever dereferences one
API = "https://www.googleapis.com/compute/v1"
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
TAG_RE = NAME_RE
METADATA_KEY_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}")
# machine families whose GPUs come built in: they cannot live-migrate either
GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")


class ApiError(Exception):
    """An error the API answers synchronously, in Google's JSON error format."""

    def __init__(self, code: int, reason: str, message: str, **extra):
        super().__init__(message)
        self.code, self.reason, self.message, self.extra = code, reason, message, extra

    def body(self) -> dict:
        err = {"message": self.message, "domain": self.extra.get("domain", "global")}
        err["reason"] = self.reason
        for key in ("location", "locationType"):
            if key in self.extra:
                err[key] = self.extra[key]
        body = {"code": self.code, "message": self.message, "errors": [err]}
        if "status" in self.extra:
            body["status"] = self.extra["status"]
        return {"error": body}


def invalid(field: str, value, why: str) -> ApiError:
    return ApiError(400, "invalid", f"Invalid value for field '{field}': '{value}'. {why}")


def not_found(path: str) -> ApiError:
    return ApiError(404, "notFound", f"The resource '{path}' was not found")


def already_exists(path: str) -> ApiError:
    return ApiError(409, "alreadyExists", f"The resource '{path}' already exists")


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds")


def new_id() -> str:
    return str(secrets.randbits(63) | 1 << 62)


def fingerprint() -> str:
    return base64.b64encode(secrets.token_bytes(8)).decode()


def region_of(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


def last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def resolve_partial(url: str, project: str) -> str:
    """A full or partial resource URL as a path starting at projects/ (or zones/ /global/)."""
    if url.startswith(("https://", "http://")):
        m = re.search(r"/compute/(?:v1|beta|alpha)/(.*)$", url)
        return m.group(1) if m else url
    return url


def zonal_name(value: str, zone: str, kind: str, field: str, bare_ok: bool) -> str:
    """The name in a (partial) URL zones/Z/KIND/NAME; the zone must be the instance's."""
    path = resolve_partial(value, "")
    m = re.fullmatch(rf"(?:projects/[^/]+/)?zones/([^/]+)/{kind}/([^/]+)", path)
    if m:
        if m.group(1) != zone:
            raise invalid(
                field, value, f"Cross-zone reference to zone '{m.group(1)}' from '{zone}'."
            )
        return m.group(2)
    if bare_ok and re.fullmatch(r"[a-z0-9][-a-z0-9]*", value):
        return value
    raise invalid(field, value, "Must be a URL to a valid Compute resource of the correct type.")


def check_labels(labels: dict, field: str) -> None:
    if not isinstance(labels, dict):
        raise invalid(field, labels, "Labels must be a map.")
    if len(labels) > 64:
        raise invalid(field, len(labels), "At most 64 labels are allowed.")
    for key, value in labels.items():
        ok_key = (
            0 < len(key) <= 63
            and key[0].isalpha()
            and key[0].islower()
            and all((c.islower() or c.isdigit() or c in "_-") for c in key)
        )
        if not ok_key:
            raise invalid(
                f"{field}.key",
                key,
                "Label keys must start with a lowercase letter "
                "and contain only lowercase letters, digits, '_' and '-', at most 63.",
            )
        ok_value = len(value) <= 63 and all(
            (c.islower() or c.isdigit() or c in "_-") for c in value
        )
        if not ok_value:
            raise invalid(
                f"{field}.value",
                value,
                "Label values must contain only lowercase "
                "letters, digits, '_' and '-', at most 63.",
            )


def check_name(name, field: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise invalid(
            field, name, "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'"
        )


def check_request_id(rid: str | None) -> None:
    if rid is None:
        return
    try:
        parsed = uuid.UUID(rid)
    except ValueError:
        raise invalid("requestId", rid, "Must be a valid UUID.") from None
    if parsed.int == 0:
        raise invalid("requestId", rid, "The zero UUID is not supported.")


def check_cidrs(ranges, field: str) -> None:
    for i, r in enumerate(ranges or []):
        try:
            ipaddress.ip_network(r, strict=False)
        except ValueError:
            raise invalid(f"{field}[{i}]", r, "Must be a valid IPv4 or IPv6 CIDR range.") from None


def duration_seconds(d) -> float | None:
    """A protobuf Duration as JSON: {"seconds": "3600", "nanos": 0} (or "3600s")."""
    if d is None:
        return None
    if isinstance(d, str):
        return float(d.rstrip("s"))
    return float(d.get("seconds", 0)) + float(d.get("nanos", 0)) / 1e9


def check_scheduling(s: dict, has_gpus: bool, field: str) -> dict:
    """Scheduling as GCE stores it (defaults filled), or the 400 GCE answers."""
    s = dict(s or {})
    model = s.get("provisioningModel", "SPOT" if s.get("preemptible") else "STANDARD")
    if model not in ("STANDARD", "SPOT"):
        raise invalid(f"{field}.provisioningModel", model, "Must be STANDARD or SPOT.")
    if model == "SPOT" and s.get("preemptible"):
        raise invalid(f"{field}.preemptible", True, "Spot VMs use provisioningModel SPOT only.")
    spot_like = model == "SPOT" or s.get("preemptible", False)
    host = s.get("onHostMaintenance", "TERMINATE" if spot_like else "MIGRATE")
    if host not in ("MIGRATE", "TERMINATE"):
        raise invalid(f"{field}.onHostMaintenance", host, "Must be MIGRATE or TERMINATE.")
    if has_gpus and host != "TERMINATE":
        raise invalid(
            f"{field}.onHostMaintenance",
            host,
            "Instances with guest accelerators do not support live migration.",
        )
    if spot_like and s.get("automaticRestart", False):
        raise invalid(
            f"{field}.automaticRestart", True, "Spot VMs cannot be restarted automatically."
        )
    if spot_like and host != "TERMINATE":
        raise invalid(f"{field}.onHostMaintenance", host, "Spot VMs must terminate on maintenance.")
    action = s.get("instanceTerminationAction")
    if action not in (None, "STOP", "DELETE"):
        raise invalid(f"{field}.instanceTerminationAction", action, "Must be STOP or DELETE.")
    run = duration_seconds(s.get("maxRunDuration"))
    if run is not None:
        if not 30 <= run <= 120 * 86400:
            raise invalid(f"{field}.maxRunDuration", run, "Must be between 30 s and 120 days.")
        if action is None:
            raise invalid(
                f"{field}.instanceTerminationAction",
                "",
                "instanceTerminationAction must be set with maxRunDuration.",
            )
        if s.get("preemptible"):
            raise invalid(f"{field}.maxRunDuration", run, "Not supported on preemptible VMs.")
    s.update(
        provisioningModel=model,
        onHostMaintenance=host,
        automaticRestart=s.get("automaticRestart", not spot_like),
        preemptible=s.get("preemptible", False),
    )
    if model == "SPOT" and action is None:
        s["instanceTerminationAction"] = "STOP"
    return s


def _metadata(meta: dict | None, field: str) -> dict:
    items = (meta or {}).get("items") or []
    seen, size = set(), 0
    for i, item in enumerate(items):
        key = item.get("key", "")
        if not METADATA_KEY_RE.fullmatch(key):
            raise invalid(f"{field}.items[{i}].key", key, "Must match [a-zA-Z0-9-_]{1,128}.")
        if key in seen:
            raise invalid(f"{field}.items[{i}].key", key, "Duplicate metadata key.")
        seen.add(key)
        size += len(key) + len(item.get("value") or "")
    if size > 512 * 1024:
        raise invalid(field, size, "Metadata may hold at most 512 KiB.")
    return {"kind": "compute#metadata", "fingerprint": fingerprint(), "items": items}


def build_instance(
    project: str, zone: str, body: dict, find_image, field: str, bare_refs: bool
) -> dict:
    """An Instance resource from an insert body (or bulkInsert's instanceProperties + name),
    validated as GCE does; addresses are left for the caller to assign."""
    base = f"{API}/projects/{project}/zones/{zone}"
    name = body.get("name")
    check_name(name, f"{field}.name")
    if not body.get("machineType"):
        raise invalid(f"{field}.machineType", "", "Required field 'machineType' not specified.")
    machine = zonal_name(
        body["machineType"], zone, "machineTypes", f"{field}.machineType", bare_refs
    )
    accels = []
    for i, acc in enumerate(body.get("guestAccelerators") or []):
        where = f"{field}.guestAccelerators[{i}]"
        kind = zonal_name(
            acc.get("acceleratorType", ""),
            zone,
            "acceleratorTypes",
            f"{where}.acceleratorType",
            bare_refs,
        )
        count = int(acc.get("acceleratorCount", 0))
        if count < 1:
            raise invalid(f"{where}.acceleratorCount", count, "Must be at least 1.")
        accels.append(
            {"acceleratorType": f"{base}/acceleratorTypes/{kind}", "acceleratorCount": count}
        )
    gpus = bool(accels) or machine.startswith(GPU_FAMILIES)
    scheduling = check_scheduling(body.get("scheduling"), gpus, f"{field}.scheduling")
    labels = body.get("labels") or {}
    check_labels(labels, f"{field}.labels")
    tags = (body.get("tags") or {}).get("items") or []
    for i, tag in enumerate(tags):
        if not TAG_RE.fullmatch(tag):
            raise invalid(
                f"{field}.tags.items[{i}]",
                tag,
                "Must be a match of regex '[a-z]([-a-z0-9]*[a-z0-9])?'",
            )
    disks = body.get("disks") or []
    boot = [d for d in disks if d.get("boot")]
    if len(boot) != 1:
        raise invalid(f"{field}.disks", "", "Exactly one boot disk must be specified.")
    attached = []
    for i, disk in enumerate(disks):
        where = f"{field}.disks[{i}]"
        init = disk.get("initializeParams") or {}
        source = init.get("sourceImage")
        if not source:
            raise invalid(
                f"{where}.initializeParams.sourceImage", "", "Required: no such disk to attach."
            )
        image = find_image(source)
        size = int(init.get("diskSizeGb") or image["diskSizeGb"])
        if size < int(image["diskSizeGb"]):
            raise invalid(
                f"{where}.initializeParams.diskSizeGb",
                size,
                "Requested disk size cannot be smaller than the image size "
                f"({image['diskSizeGb']} GB)",
            )
        dev = disk.get("deviceName") or (name if disk.get("boot") else f"persistent-disk-{i}")
        disk_name = init.get("diskName") or (name if i == 0 else f"{name}-{i}")
        attached.append(
            {
                "kind": "compute#attachedDisk",
                "type": "PERSISTENT",
                "mode": disk.get("mode", "READ_WRITE"),
                "source": f"{base}/disks/{disk_name}",
                "deviceName": dev,
                "index": i,
                "boot": bool(disk.get("boot")),
                "autoDelete": disk.get("autoDelete", False),
                "interface": disk.get("interface", "SCSI"),
                "diskSizeGb": str(size),
                "guestOsFeatures": image.get("guestOsFeatures", []),
                "licenses": [image["selfLink"]],
                "architecture": "X86_64",
            }
        )
    nics = body.get("networkInterfaces") or []
    if not nics:
        raise invalid(
            f"{field}.networkInterfaces", "", "At least one network interface is required."
        )
    region = region_of(zone)
    interfaces = []
    for i, nic in enumerate(nics):
        network = resolve_partial(nic.get("network") or "global/networks/default", project)
        if not network.startswith("projects/"):
            network = f"projects/{project}/{network}"
        sub = nic.get("subnetwork") or f"regions/{region}/subnetworks/{last(network)}"
        sub = resolve_partial(sub, project)
        if not sub.startswith("projects/"):
            sub = f"projects/{project}/{sub}"
        interfaces.append(
            {
                "kind": "compute#networkInterface",
                "network": f"{API}/{network}",
                "subnetwork": f"{API}/{sub}",
                "name": f"nic{i}",
                "fingerprint": fingerprint(),
                "stackType": "IPV4_ONLY",
                "accessConfigs": [
                    {
                        "kind": "compute#accessConfig",
                        "type": ac.get("type", "ONE_TO_ONE_NAT"),
                        "name": ac.get("name", "External NAT"),
                        "networkTier": ac.get("networkTier", "PREMIUM"),
                    }
                    for ac in nic.get("accessConfigs") or []
                ],
            }
        )
    now = now_rfc3339()
    instance = {
        "kind": "compute#instance",
        "id": new_id(),
        "creationTimestamp": now,
        "name": name,
        "description": body.get("description", ""),
        "tags": {"items": tags, "fingerprint": fingerprint()}
        if tags
        else {"fingerprint": fingerprint()},
        "machineType": f"{base}/machineTypes/{machine}",
        "status": "PROVISIONING",
        "zone": base,
        "canIpForward": bool(body.get("canIpForward", False)),
        "networkInterfaces": interfaces,
        "disks": attached,
        "metadata": _metadata(body.get("metadata"), f"{field}.metadata"),
        "serviceAccounts": body.get("serviceAccounts") or [],
        "selfLink": f"{base}/instances/{name}",
        "scheduling": scheduling,
        "cpuPlatform": "Intel Cascade Lake",
        "labels": labels,
        "labelFingerprint": fingerprint(),
        "startRestricted": False,
        "deletionProtection": bool(body.get("deletionProtection", False)),
        "fingerprint": fingerprint(),
        "lastStartTimestamp": now,
        "satisfiesPzi": True,
    }
    if not labels:
        del instance["labels"]
    if accels:
        instance["guestAccelerators"] = accels
    if body.get("hostname"):
        instance["hostname"] = body["hostname"]
    return instance


def build_firewall(project: str, body: dict) -> dict:
    """A Firewall resource from an insert (or a patched rule), validated as GCE does. An
    ingress rule without sources gets GCE's default: 0.0.0.0/0, the whole Internet."""
    name = body.get("name")
    check_name(name, "resource.name")
    allowed, denied = body.get("allowed") or [], body.get("denied") or []
    if bool(allowed) == bool(denied):
        raise invalid("resource", name, "Exactly one of 'allowed' or 'denied' must be set.")
    for i, rule in enumerate(allowed + denied):
        if not rule.get("IPProtocol"):
            raise invalid(f"resource.allowed[{i}].IPProtocol", "", "Required.")
    direction = body.get("direction", "INGRESS")
    if direction not in ("INGRESS", "EGRESS"):
        raise invalid("resource.direction", direction, "Must be INGRESS or EGRESS.")
    check_cidrs(body.get("sourceRanges"), "resource.sourceRanges")
    check_cidrs(body.get("destinationRanges"), "resource.destinationRanges")
    for key in ("targetTags", "sourceTags"):
        for tag in body.get(key) or []:
            check_name(tag, f"resource.{key}")
    network = resolve_partial(body.get("network") or "global/networks/default", project)
    if not network.startswith("projects/"):
        network = f"projects/{project}/{network}"
    fw = {
        "kind": "compute#firewall",
        "id": new_id(),
        "creationTimestamp": now_rfc3339(),
        "name": name,
        "description": body.get("description", ""),
        "network": f"{API}/{network}",
        "priority": int(body.get("priority", 1000)),
        "direction": direction,
        "logConfig": {"enable": False},
        "disabled": bool(body.get("disabled", False)),
        "selfLink": f"{API}/projects/{project}/global/firewalls/{name}",
    }
    for key in (
        "allowed",
        "denied",
        "targetTags",
        "sourceTags",
        "destinationRanges",
        "targetServiceAccounts",
        "sourceServiceAccounts",
    ):
        if body.get(key):
            fw[key] = body[key]
    ranges = body.get("sourceRanges")
    sources = ranges or body.get("sourceTags") or body.get("sourceServiceAccounts")
    if direction == "INGRESS" and not sources:
        ranges = ["0.0.0.0/0"]
    if ranges:
        fw["sourceRanges"] = ranges
    return fw
