"""What GCE accepts, as pure functions: names, labels, machine types, request bodies, and
which operation errors mean "no capacity here" or "over quota". Nothing here calls the API."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Mapping
from datetime import datetime

from mlcloud.errors import UsageError

DEFAULT_USER = "mlcloud"  # created by the guest agent from the ssh-keys metadata
DISK_GB = 200
DLVM_PROJECT = "deeplearning-platform-release"
DLVM_FAMILY = "pytorch-latest-gpu"
NETWORK = "global/networks/default"
# what a VM running as the cluster's service account may ask its metadata server a token for
STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
# The catalog's n1 rows name their GPUs by model; GCE by accelerator type.
ACCELERATORS = {
    "T4": "nvidia-tesla-t4",
    "V100": "nvidia-tesla-v100",
    "P100": "nvidia-tesla-p100",
    "P4": "nvidia-tesla-p4",
    "L4": "nvidia-l4",
    "A100": "nvidia-tesla-a100",
}
# Machine families that come with their GPUs attached (and so cannot live-migrate).
GPU_FAMILIES = ("a2-", "a3-", "a4-", "g2-", "g4-")
HYPERDISK_ONLY = ("a3-ultragpu", "a4-")
CAPACITY_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"}
QUOTA_CODES = {"QUOTA_EXCEEDED", "quotaExceeded"}
RATE_CODES = {
    "rateLimitExceeded",
    "RATE_LIMIT_EXCEEDED",
    "userRateLimitExceeded",
    "RESOURCE_OPERATION_RATE_EXCEEDED",
}
EXISTS_CODES = {"alreadyExists", "RESOURCE_ALREADY_EXISTS"}
# a machine or accelerator type the zone does not offer (GCE: 400 for machine types, 404 for
# accelerator types): another zone may
_NOT_IN_ZONE = re.compile(
    r"(not supported|does not exist) in zone"
    r"|/zones/[^/]+/(acceleratorTypes|machineTypes)/[^/' ]+' was not found"
)
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_NAMESPACE = uuid.UUID("5b0b6a39-7f0e-4a36-9a1b-6d1f2f8c0e51")  # mlcloud's request ids


def region_of(zone: str) -> str:
    """us-central1-a -> us-central1 (a region stays itself)."""
    return zone.rpartition("-")[0] if re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", zone) else zone


def label_value(text: str) -> str:
    """`text` as a GCE label value (lowercase letters, digits, _ and -, at most 63): as is when
    valid (cluster uids and home ids are), else cleaned and suffixed with a hash of the
    original, so two different texts never share a label."""
    if _LABEL_VALUE.fullmatch(text):
        return text
    clean = re.sub(r"[^a-z0-9_-]", "-", text.lower())[:50]
    return f"{clean}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def labels(uid: str, name: str, owner: str) -> dict[str, str]:
    return {
        "mlcloud-cluster": label_value(uid),
        "mlcloud-name": label_value(name),
        "mlcloud-owner": label_value(owner),
    }


def label_filter(uid: str) -> str:
    return f'labels.mlcloud-cluster = "{label_value(uid)}"'


def tag(uid: str) -> str:
    """The network tag the cluster's firewall rules target (cluster names are valid already)."""
    return f"mlcloud-{uid}"


def instance_name(uid: str, k: int) -> str:
    return f"mlcloud-{uid}-{k}"


def directory(uid: str, name: str) -> str:
    """A VM's directory under ~/.mlcloud/<uid>/: `node-K` for the VM mlcloud named with
    number K, else its name (a VM made before, or a clone that kept the labels)."""
    prefix = instance_name(uid, 0)[:-1]
    k = name[len(prefix) :] if name.startswith(prefix) else ""
    return f"node-{int(k)}" if k.isdigit() else name


def firewall_names(uid: str) -> tuple[str, str]:
    return f"mlcloud-{uid}-ssh", f"mlcloud-{uid}-int"  # 63 at most for a 40-char name


def request_id(uid: str, attempt: str) -> str:
    """A UUID (GCE's request id format) fixed by the cluster and the attempt: a retried or
    resumed insert sends the same one, so GCE makes the VMs once."""
    return str(uuid.uuid5(_NAMESPACE, f"{uid}:{attempt}"))


def image_ref(image: str | None, project: str) -> tuple[str, str, str | None]:
    """(project, image path, family to look up) for `image:` as users write it: NAME (of the
    project), projects/P/global/images/NAME or .../family/F, or a full URL of either; none:
    the Deep Learning VM family."""
    if not image:
        return DLVM_PROJECT, "", DLVM_FAMILY
    if re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", image):
        return project, f"projects/{project}/global/images/{image}", None
    m = re.search(r"(?:^|/)projects/([^/]+)/global/images/(family/)?([^/]+)$", image)
    if not m:
        raise UsageError(
            f"image {image!r}: name one as NAME, projects/PROJECT/global/images/NAME or "
            "projects/PROJECT/global/images/family/FAMILY"
        )
    owner, family, name = m.groups()
    if family:
        return owner, "", name
    return owner, f"projects/{owner}/global/images/{name}", None


def split_type(instance_type: str) -> tuple[str, list[tuple[str, int]]]:
    """`n1-standard-16+T4:4` -> ("n1-standard-16", [("nvidia-tesla-t4", 4)]); a type with
    its GPUs built in (a2, a3, g2) has no guest accelerators to ask for."""
    m = re.fullmatch(
        r"([a-z][-a-z0-9]*)(?:\+([A-Za-z0-9][-A-Za-z0-9]*)(?::([1-9]\d?))?)?", instance_type
    )
    if not m:
        raise UsageError(
            f"instance type {instance_type!r}: write a GCE machine type, with its GPUs after + "
            "if it takes guest accelerators (n1-standard-16+T4:4, a2-highgpu-8g)"
        )
    machine, model, count = m.groups()
    if not model:
        return machine, []
    return machine, [(ACCELERATORS.get(model.upper(), model.lower()), int(count or 1))]


def has_gpus(instance_type: str) -> bool:
    return "+" in instance_type or instance_type.startswith(GPU_FAMILIES)


def disk_type(machine: str) -> str:
    return "hyperdisk-balanced" if machine.startswith(HYPERDISK_ONLY) else "pd-balanced"


def scheduling(instance_type: str, spot: bool, max_run_s: int | None) -> dict:
    """GPU VMs cannot live-migrate (TERMINATE on host maintenance); Spot and budget-limited
    VMs are deleted, not stopped, when they end, so no disk keeps billing."""
    s: dict = {}
    if has_gpus(instance_type) or spot:
        s["on_host_maintenance"] = "TERMINATE"
    if spot:
        s.update(provisioning_model="SPOT", automatic_restart=False)
    if max_run_s is not None:
        s["max_run_duration"] = {"seconds": max_run_s}
    if spot or max_run_s is not None:
        s["instance_termination_action"] = "DELETE"
    return s


def max_run_seconds(deadline: float | None, now: float) -> int | None:
    """scheduling.maxRunDuration for a budget deadline: GCE takes 30 s to 120 days."""
    if deadline is None:
        return None
    return int(min(max(deadline - now, 30), 120 * 86400))


def instance_properties(
    *,
    instance_type: str,
    image: str,
    disk_gb: int | None,
    labels: dict[str, str],
    tag: str,
    user: str,
    public_key: str,
    spot: bool,
    max_run_s: int | None,
    account: str | None = None,
) -> dict:
    """The body every VM of one bulkInsert shares (snake_case, as the client takes it). VMs
    run as `account` (the cluster's own, for its buckets) or, without one, as no account."""
    machine, accelerators = split_type(instance_type)
    service = [{"email": account, "scopes": [STORAGE_SCOPE]}] if account else []
    return {
        "machine_type": machine,
        "guest_accelerators": [
            {"accelerator_type": a, "accelerator_count": n} for a, n in accelerators
        ],
        "disks": [
            {
                "boot": True,
                "auto_delete": True,
                "initialize_params": {
                    "source_image": image,
                    "disk_size_gb": disk_gb or DISK_GB,
                    "disk_type": disk_type(machine),
                    "labels": labels,
                },
            }
        ],
        "network_interfaces": [
            {
                "network": NETWORK,
                "access_configs": [{"name": "External NAT", "type_": "ONE_TO_ONE_NAT"}],
            }
        ],
        "labels": labels,
        "tags": {"items": [tag]},
        "metadata": {
            "items": [
                {"key": "ssh-keys", "value": f"{user}:{public_key} {user}"},
                {"key": "install-nvidia-driver", "value": "True"},
                {"key": "enable-oslogin", "value": "FALSE"},
            ]
        },
        "scheduling": scheduling(instance_type, spot, max_run_s),
        "service_accounts": service,
    }


def firewalls(uid: str, owner: str, cidrs: list[str]) -> list[dict]:
    """SSH from `cidrs` only and all traffic within the cluster's tag. Firewall rules carry no
    labels: the description names the cluster and owner, for `gc`."""
    ssh, internal = firewall_names(uid)
    what = f"mlcloud cluster={uid} owner={owner}"
    return [
        {
            "name": ssh,
            "network": NETWORK,
            "direction": "INGRESS",
            "allowed": [{"I_p_protocol": "tcp", "ports": ["22"]}],
            "source_ranges": cidrs,
            "target_tags": [tag(uid)],
            "description": f"{what}: SSH from the caller",
        },
        {
            "name": internal,
            "network": NETWORK,
            "direction": "INGRESS",
            "allowed": [{"I_p_protocol": "all"}],
            "source_tags": [tag(uid)],
            "target_tags": [tag(uid)],
            "description": f"{what}: all traffic within the cluster (NCCL, rendezvous)",
        },
    ]


def storage_warnings(uris: tuple[str, ...]) -> tuple[str, ...]:
    """The URIs a GCE cluster's service account cannot cover (s3://): said once at `up`."""
    return tuple(
        f"storage {uri}: a GCE cluster's nodes get credentials for gs:// buckets only, so "
        "mlcloud gives them none for this one; grant them access yourself"
        for uri in uris
        if not uri.startswith("gs://")
    )


def epoch(stamp: str) -> float | None:
    """GCE's creationTimestamp (RFC 3339) in seconds since the epoch."""
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else None
    except ValueError:
        return None


def firewall_owner(description: str) -> tuple[str, str] | None:
    """(cluster uid, owner) from a rule's description, None if mlcloud did not make it."""
    m = re.match(r"mlcloud cluster=(\S+) owner=(\S+):", description or "")
    return (m.group(1), m.group(2)) if m else None


def classify(code: str, message: str) -> str | None:
    """'capacity', 'quota', 'rate', 'exists' or None for one error of an operation or a call."""
    if code in CAPACITY_CODES or _NOT_IN_ZONE.search(message):
        return "capacity"
    if code in QUOTA_CODES or "quota" in code.lower():
        return "quota"
    if code in RATE_CODES:
        return "rate"
    if code in EXISTS_CODES:
        return "exists"
    return None


def adc_present(env: Mapping[str, str]) -> bool:
    """Whether Application Default Credentials are set up here, by their files (a key file, or
    gcloud's ADC file): no metadata-server probe, which costs seconds off Google Cloud."""
    if env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return True
    config = env.get("CLOUDSDK_CONFIG") or os.path.join(
        env.get("HOME", os.path.expanduser("~")), ".config", "gcloud"
    )
    return os.path.isfile(os.path.join(config, "application_default_credentials.json"))
