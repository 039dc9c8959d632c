"""The fake Compute API's state: instances, firewalls, operations, faults and the request log.

Time moves lazily: every call first applies the transitions that are due (an operation
finishing, PROVISIONING -> STAGING -> RUNNING, a Spot VM's maxRunDuration), so nothing runs
in the background and a client killed mid-way leaves exactly what GCE would have.
"""

from __future__ import annotations

import heapq
import itertools
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from .gce_catalog import image_resource, known_zones, public_images
from .gce_model import (
    API,
    ApiError,
    check_request_id,
    invalid,
    last,
    new_id,
    not_found,
    now_rfc3339,
    region_of,
    resolve_partial,
)

# fake public addresses come from the documentation ranges (RFC 5737): never routable
PUBLIC_POOLS = ("203.0.113.", "198.51.100.", "192.0.2.")


@dataclass
class Call:
    """One request as the fake saw it (the request log)."""

    method: str
    path: str
    query: dict[str, str]
    body: dict | None
    status: int = 0
    at: float = field(default_factory=time.time)

    @property
    def request_id(self) -> str | None:
        return self.query.get("requestId")


@dataclass
class _Op:
    resource: dict
    scope: str  # "zones/<zone>" or "global"


@dataclass
class _Quota:
    metric: str
    limit: int  # instances allowed in the region (a stand-in for GPU/CPU counts)
    sync: bool  # answer 403 on the call instead of failing the operation


class ComputeState:
    """What the fake holds, its clock and its faults; the public methods are its Python API
    (the API's handlers are in gce_compute.Compute)."""

    def __init__(
        self, op_seconds: float = 0.2, wait_cap: float = 120.0, request_id_ttl: float = 3600.0
    ):
        self.op_seconds = op_seconds  # how long operations take (PROVISIONING..RUNNING)
        self.wait_cap = wait_cap  # operations.wait returns by then even if not DONE (GCE: 2 min)
        # a bulkInsert's VMs are listed only as its operation ends (GCE makes them as it runs;
        # the default lists them at once)
        self.late_bulk_instances = False
        # how long a requestId replays its first operation (GCE: at least 60 min)
        self.request_id_ttl = request_id_ttl
        self._cond = threading.Condition()
        self._events: list = []  # heap of (when, seq, fn), when on the fake's clock
        self._offset = 0.0  # the fake's clock runs this far ahead (advance_clock)
        self._seq = itertools.count()
        self._instances: dict[tuple[str, str, str], dict] = {}  # (project, zone, name)
        self._firewalls: dict[tuple[str, str], dict] = {}  # (project, name)
        self._ops: dict[tuple[str, str, str], _Op] = {}  # (project, scope, name)
        # (project, requestId) -> (operation, when first seen)
        self._by_request: dict[tuple[str, str], tuple[_Op, float]] = {}
        self._images = public_images()
        self._zones = known_zones()
        self._zone_ids = {z: new_id() for z in self._zones}
        self._region_ids = {region_of(z): new_id() for z in self._zones}
        self._private = itertools.count(2)
        self._public_free = [p + str(i) for p in PUBLIC_POOLS for i in range(1, 255)]
        self._capacity: dict[str, int | None] = {}  # zone -> VMs it can still place
        self._capacity_details: set[str] = set()
        self._unsupported: set[tuple[str, str]] = set()  # (zone, machine or accelerator type)
        self._quotas: dict[str, _Quota] = {}  # region -> quota
        # zone (None: any) -> how many more insert operations end RATE_LIMIT_EXCEEDED
        self._throttled_ops: dict[str | None, int] = {}
        self._reclaim: dict[str, int] = {}  # zone -> how many more VMs end while starting
        # injected call failures: [remaining, method, path regex, status, reason, message]
        self._failures: list[list] = []
        self._log: list[Call] = []

    # -- the Python API: faults ---------------------------------------------------------
    def exhaust(self, zone: str, details: bool = False) -> None:
        """The zone has no capacity: inserts end DONE with ZONE_RESOURCE_POOL_EXHAUSTED
        (`details`: the _WITH_DETAILS variant) and leave no instance."""
        with self._cond:
            self._capacity[zone] = 0
            if details:
                self._capacity_details.add(zone)

    def set_capacity(self, zone: str, vms: int | None) -> None:
        """The zone places `vms` more VMs, then is exhausted (None: unlimited again)."""
        with self._cond:
            self._capacity[zone] = vms
            self._capacity_details.discard(zone)

    def unsupported(self, zone: str, kind: str) -> None:
        """The machine type or accelerator type `kind` is not offered in `zone`, answered as
        GCE does: a machine type with 400 "Machine type with name 'K' does not exist in zone
        'Z'", an accelerator type with 404 "The resource '.../zones/Z/acceleratorTypes/K'
        was not found" (at the insert call, no operation)."""
        with self._cond:
            self._unsupported.add((zone, kind))

    def quota(
        self, region: str, limit: int = 0, metric: str = "NVIDIA_T4_GPUS", sync: bool = False
    ):
        """At most `limit` instances in `region`; beyond, QUOTA_EXCEEDED in the operation
        (or, `sync`, a 403 quotaExceeded on the call itself, which GCE also does)."""
        with self._cond:
            self._quotas[region] = _Quota(metric, limit, sync)

    def rate_limit(self, calls: int = 1, method: str | None = None, path: str | None = None):
        """The next `calls` API calls (matching `method` and the regex `path`) get 429
        rateLimitExceeded."""
        self.fail_calls(calls, 429, "rateLimitExceeded", method, path)

    def fail_calls(
        self,
        calls: int = 1,
        status: int = 503,
        reason: str = "backendError",
        method: str | None = None,
        path: str | None = None,
        message: str | None = None,
    ) -> None:
        """The next `calls` matching API calls answer `status` with `reason`: 503
        backendError (the client retries GETs on its own), 403 forbidden (a missing IAM
        permission), 429 rateLimitExceeded, ..."""
        default = {
            429: "Rate Limit Exceeded",
            403: "Required 'compute.instances.create' permission for the project",
            503: "Internal error. Please try again.",
        }
        text = message or default.get(status, reason)
        with self._cond:
            self._failures.append([calls, method, path, status, reason, text])

    def rate_limit_operations(self, calls: int = 1, zone: str | None = None) -> None:
        """The next `calls` inserts and deletes (of VMs in `zone`; None: of anything, firewall
        rules too) are accepted, and their operation ends DONE with RATE_LIMIT_EXCEEDED (HTTP
        429 in the operation), changing nothing: GCE throttles per resource this way as well
        as on the call."""
        with self._cond:
            self._throttled_ops[zone] = self._throttled_ops.get(zone, 0) + calls

    def reclaim_while_starting(self, zone: str, vms: int = 1) -> None:
        """The next `vms` VMs placed in `zone` are reclaimed before they run (a Spot VM
        preempted while STAGING): deleted if their instanceTerminationAction is DELETE, else
        TERMINATED. Their insert operation has succeeded already."""
        with self._cond:
            self._reclaim[zone] = self._reclaim.get(zone, 0) + vms

    def slow(self, seconds: float) -> None:
        """Operations started from now on take `seconds`."""
        with self._cond:
            self.op_seconds = seconds

    def preempt(self, zone: str, name: str, project: str | None = None) -> None:
        """Reclaim a Spot VM: deleted if its instanceTerminationAction is DELETE, else
        TERMINATED (stopped), as GCE does."""
        with self._cond:
            for p, z, n in list(self._instances):
                if z == zone and n == name and project in (None, p):
                    self._terminate_by_cloud(p, z, n)
                    return
            raise KeyError(f"no instance {name} in {zone}")

    def add_image(self, project: str, name: str, family: str | None = None, disk_gb: int = 10):
        """A custom image (e.g. a spec's `image:`) in `project`."""
        with self._cond:
            self._images.append(image_resource(project, name, family or name, disk_gb))

    def reset(self) -> None:
        """Forget all resources, faults, custom images and the log."""
        with self._cond:
            keep = (self.op_seconds, self.wait_cap, self.request_id_ttl)
            ComputeState.__init__(self, *keep)

    # -- the Python API: what is there --------------------------------------------------
    def calls(self, method: str | None = None, path: str | None = None) -> list[Call]:
        """The request log (API calls, not tokens), filtered by method and path regex."""
        with self._cond:
            return [
                c
                for c in self._log
                if (method is None or c.method == method)
                and (path is None or re.search(path, c.path))
            ]

    def clear_calls(self) -> None:
        with self._cond:
            self._log.clear()

    def instances(self, project: str | None = None, zone: str | None = None) -> list[dict]:
        """Instances as GCE would list them now (those being deleted included)."""
        with self._cond:
            self._advance()
            return [
                dict(i)
                for (p, z, _), i in sorted(self._instances.items())
                if project in (None, p) and zone in (None, z)
            ]

    def firewalls(self, project: str | None = None) -> list[dict]:
        with self._cond:
            self._advance()
            return [
                dict(f) for (p, _), f in sorted(self._firewalls.items()) if project in (None, p)
            ]

    def is_empty(self) -> bool:
        """No instance and no firewall rule left (what `down` must achieve)."""
        return not self.instances() and not self.firewalls()

    # -- time ---------------------------------------------------------------------------
    def advance_clock(self, seconds: float) -> None:
        """Move the fake's clock forward: what falls due within `seconds` happens now
        (operations ending, a maxRunDuration deleting its VM, requestIds expiring)."""
        with self._cond:
            self._offset += seconds
            self._advance()

    def _now(self) -> float:
        return time.monotonic() + self._offset

    def _at(self, delay: float, fn) -> None:
        heapq.heappush(self._events, (self._now() + delay, next(self._seq), fn))
        self._cond.notify_all()

    def _advance(self) -> None:
        now = self._now()
        while self._events and self._events[0][0] <= now:
            _, _, fn = heapq.heappop(self._events)
            fn()
        self._cond.notify_all()

    # -- request plumbing ---------------------------------------------------------------
    def record(self, call: Call) -> None:
        with self._cond:
            self._log.append(call)

    def injected_failure(self, method: str, path: str) -> ApiError | None:
        """Consume one injected failure that matches this call (see fail_calls)."""
        with self._cond:
            for rule in self._failures:
                remaining, want_method, want_path, status, reason, message = rule
                if (
                    remaining > 0
                    and want_method in (None, method)
                    and (want_path is None or re.search(want_path, path))
                ):
                    rule[0] -= 1
                    extra = {"429": {"domain": "usageLimits", "status": "RESOURCE_EXHAUSTED"}}
                    return ApiError(status, reason, message, **extra.get(str(status), {}))
            return None

    def _known_zone(self, project: str, zone: str) -> None:
        if zone not in self._zone_ids:
            raise not_found(f"projects/{project}/zones/{zone}")

    # -- operations ---------------------------------------------------------------------
    def _new_op(self, project, scope, kind, target, caller, rid) -> _Op:
        rand = "-".join(secrets.token_hex(n) for n in (6, 4, 4))
        name = f"operation-{int(time.time() * 1000)}-{rand}"
        now = now_rfc3339()
        res = {
            "kind": "compute#operation",
            "id": new_id(),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "RUNNING",
            "user": caller or "anonymous",
            "progress": 0,
            "insertTime": now,
            "startTime": now,
            "selfLink": f"{API}/projects/{project}/{scope}/operations/{name}",
        }
        if scope.startswith("zones/"):
            res["zone"] = f"{API}/projects/{project}/{scope}"
        op = _Op(res, scope)
        self._ops[(project, scope, name)] = op
        if rid:
            self._by_request[(project, rid)] = (op, self._now())
        return op

    def _finish(self, op: _Op, error: dict | None = None, http=(None, None)) -> None:
        op.resource.update(status="DONE", progress=100, endTime=now_rfc3339())
        if error:
            op.resource["error"] = {"errors": [error]}
            op.resource["httpErrorStatusCode"], op.resource["httpErrorMessage"] = http

    def _replay(self, project: str, rid: str | None) -> dict | None:
        """The operation a repeated requestId already started (GCE ignores the repeat)."""
        check_request_id(rid)
        seen = self._by_request.get((project, rid)) if rid else None
        if seen is None or self._now() - seen[1] > self.request_id_ttl:
            return None
        return dict(seen[0].resource)

    def get_operation(self, project: str, scope: str, name: str, wait: bool = False) -> dict:
        deadline = time.monotonic() + self.wait_cap
        with self._cond:
            while True:
                self._advance()
                op = self._ops.get((project, scope, name))
                if op is None:
                    raise not_found(f"projects/{project}/{scope}/operations/{name}")
                left = deadline - time.monotonic()
                if not wait or op.resource["status"] == "DONE" or left <= 0:
                    return dict(op.resource)
                nxt = self._events[0][0] - self._now() if self._events else left
                self._cond.wait(max(0.001, min(left, nxt)))

    # -- addresses ----------------------------------------------------------------------
    def _assign_addresses(self, instance: dict) -> None:
        for nic in instance["networkInterfaces"]:
            n = next(self._private)
            nic["networkIP"] = f"10.{128 + (n >> 16) % 64}.{(n >> 8) & 255}.{n & 255}"
        self._assign_public(instance)

    def _assign_public(self, instance: dict) -> None:
        """Ephemeral external addresses: a new one at each start, as on GCE."""
        for nic in instance["networkInterfaces"]:
            for ac in nic["accessConfigs"]:
                if not self._public_free:
                    raise ApiError(403, "quotaExceeded", "Quota 'IN_USE_ADDRESSES' exceeded.")
                ac["natIP"] = self._public_free.pop(0)

    def _release_addresses(self, instance: dict) -> None:
        for nic in instance["networkInterfaces"]:
            for ac in nic["accessConfigs"]:
                if ac.get("natIP"):
                    self._public_free.append(ac.pop("natIP"))

    # -- placement and the cloud's own actions -------------------------------------
    def _placement_error(self, project: str, zone: str, count: int, sample: dict) -> tuple | None:
        """Why `count` more VMs cannot go to this zone now: (error, http) for the operation,
        or None; a sync quota answers at once (ApiError)."""
        throttled = self._throttled(project, zone)
        if throttled:
            return throttled
        region = region_of(zone)
        quota = self._quotas.get(region)
        if quota is not None:
            used = sum(
                1 for (p, z, _) in self._instances if p == project and region_of(z) == region
            )
            if used + count > quota.limit:
                limit = float(quota.limit)
                msg = f"Quota '{quota.metric}' exceeded.  Limit: {limit} in region {region}."
                if quota.sync:
                    raise ApiError(403, "quotaExceeded", msg, domain="usageLimits")
                error = {
                    "code": "QUOTA_EXCEEDED",
                    "message": msg,
                    "errorDetails": [
                        {
                            "quotaInfo": {
                                "metricName": f"compute.googleapis.com/{quota.metric.lower()}",
                                "limitName": f"{quota.metric}-per-project-region",
                                "dimensions": {"region": region},
                                "limit": float(quota.limit),
                            }
                        }
                    ],
                }
                return error, (403, "FORBIDDEN")
        cap = self._capacity.get(zone)
        if cap is not None and cap < count:
            if zone in self._capacity_details:
                what = f"{last(sample['machineType'])} VM instance"
                for accel in sample.get("guestAccelerators", [])[:1]:
                    gpus = f"{accel['acceleratorCount']} {last(accel['acceleratorType'])}"
                    what += f" with {gpus} accelerator(s)"
                msg = (
                    f"A {what} is currently unavailable in the {zone} zone. Alternatively, you "
                    "can try your request again with a different VM hardware configuration or "
                    "at a later time."
                )
                code = "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"
            else:
                msg = (
                    f"The zone 'projects/{project}/zones/{zone}' does not have enough resources "
                    "available to fulfill the request.  Try a different zone, or try again later."
                )
                code = "ZONE_RESOURCE_POOL_EXHAUSTED"
            return {"code": code, "message": msg}, (503, "SERVICE UNAVAILABLE")
        return None

    def _throttled(self, project: str, zone: str | None) -> tuple | None:
        """(error, http) for an insert or delete whose operation ends throttled
        (rate_limit_operations), or None; `zone` None: a global resource's."""
        for where in (zone, None) if zone else (None,):
            if self._throttled_ops.get(where, 0) > 0:
                self._throttled_ops[where] -= 1
                scope = f"zones/{zone}" if zone else "global"
                error = {
                    "code": "RATE_LIMIT_EXCEEDED",
                    "message": f"Operation rate exceeded for resource 'projects/{project}/"
                    f"{scope}'. Too frequent operations from the source resource.",
                }
                return error, (429, "TOO MANY REQUESTS")
        return None

    def _check_supported(self, zone: str, instance: dict) -> None:
        machine = last(instance["machineType"])
        if (zone, machine) in self._unsupported:
            raise invalid(
                "resource.machineType",
                f"zones/{zone}/machineTypes/{machine}",
                f"Machine type with name '{machine}' does not exist in zone '{zone}'.",
            )
        for acc in instance.get("guestAccelerators", []):
            kind = last(acc["acceleratorType"])
            if (zone, kind) in self._unsupported:
                raise not_found(resolve_partial(acc["acceleratorType"], ""))

    def _terminate_by_cloud(self, project, zone, name, expect=None) -> None:
        """The cloud ends a VM (Spot reclaim, maxRunDuration): DELETE or STOP."""
        key = (project, zone, name)
        inst = self._instances.get(key)
        if inst is None or (expect is not None and inst is not expect):
            return
        if inst["scheduling"].get("instanceTerminationAction") == "DELETE":
            self._release_addresses(inst)
            del self._instances[key]
        else:
            inst["status"] = "TERMINATED"
