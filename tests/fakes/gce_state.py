"""The fake Compute API's state: instances, firewalls, operations, faults and the request log.

Time moves lazily: every call first applies the transitions that are due (an operation
finishing, PROVISIONING -> STAGING -> RUNNING, a Spot VM's maxRunDuration), so nothing runs
in the background and a client killed mid-way leaves exactly what GCE would have.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from .gce_filter import FilterError, compile_filter
from .gce_model import (
    API,
    ApiError,
    already_exists,
    build_firewall,
    build_instance,
    check_request_id,
    duration_seconds,
    fingerprint,
    invalid,
    known_zones,
    last,
    new_id,
    not_found,
    now_rfc3339,
    public_images,
    region_of,
    region_resource,
    resolve_partial,
    zone_resource,
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


class Compute:
    """Everything the fake holds; the fault-injection methods are its Python API."""

    def __init__(
        self, op_seconds: float = 0.2, wait_cap: float = 120.0, request_id_ttl: float = 3600.0
    ):
        self.op_seconds = op_seconds  # how long operations take (PROVISIONING..RUNNING)
        self.wait_cap = wait_cap  # operations.wait returns by then even if not DONE (GCE: 2 min)
        # how long a requestId replays its first operation (GCE: at least 60 min)
        self.request_id_ttl = request_id_ttl
        self._cond = threading.Condition()
        self._events: list = []  # heap of (when, seq, fn)
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
        from .gce_model import image_resource

        with self._cond:
            self._images.append(image_resource(project, name, family or name, disk_gb))

    def reset(self) -> None:
        """Forget all resources, faults, custom images and the log."""
        with self._cond:
            keep = (self.op_seconds, self.wait_cap, self.request_id_ttl)
            Compute.__init__(self, *keep)

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
    def _at(self, delay: float, fn) -> None:
        heapq.heappush(self._events, (time.monotonic() + delay, next(self._seq), fn))
        self._cond.notify_all()

    def _advance(self) -> None:
        now = time.monotonic()
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
            self._by_request[(project, rid)] = (op, time.monotonic())
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
        if seen is None or time.monotonic() - seen[1] > self.request_id_ttl:
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
                nxt = self._events[0][0] - time.monotonic() if self._events else left
                self._cond.wait(max(0.001, min(left, nxt)))

    # -- addresses ----------------------------------------------------------------------
    def _assign_addresses(self, instance: dict) -> None:
        for nic in instance["networkInterfaces"]:
            n = next(self._private)
            nic["networkIP"] = f"10.{128 + (n >> 16) % 64}.{(n >> 8) & 255}.{n & 255}"
            for ac in nic["accessConfigs"]:
                if not self._public_free:
                    raise ApiError(403, "quotaExceeded", "Quota 'IN_USE_ADDRESSES' exceeded.")
                ac["natIP"] = self._public_free.pop(0)

    def _release_addresses(self, instance: dict) -> None:
        for nic in instance["networkInterfaces"]:
            for ac in nic["accessConfigs"]:
                if ac.get("natIP"):
                    self._public_free.append(ac.pop("natIP"))

    # -- instances ----------------------------------------------------------------------
    def _find_image(self, ref: str) -> dict:
        path = resolve_partial(ref, "")
        m = re.fullmatch(r"projects/([^/]+)/global/images/(family/)?([^/]+)", path)
        if not m:
            raise invalid(
                "sourceImage", ref, "Must be a URL to a valid Compute resource of the correct type."
            )
        project, family, name = m.groups()
        if family:
            return self._image_from_family(project, name)
        for image in self._images:
            if image["selfLink"].endswith(f"/projects/{project}/global/images/{name}"):
                return image
        raise not_found(f"projects/{project}/global/images/{name}")

    def _image_from_family(self, project: str, family: str) -> dict:
        found = [
            i
            for i in self._images
            if i["family"] == family
            and f"/projects/{project}/" in i["selfLink"]
            and "deprecated" not in i
        ]
        if not found:
            raise not_found(f"projects/{project}/global/images/family/{family}")
        return found[-1]

    def _placement_error(self, project: str, zone: str, count: int, sample: dict) -> tuple | None:
        """Why `count` more VMs cannot go to this zone now: (error, http) for the operation,
        or None; a sync quota answers at once (ApiError)."""
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

    def _place(self, project: str, zone: str, instance: dict, delay: float) -> None:
        """The instance exists now (PROVISIONING), STAGING halfway, RUNNING at `delay`."""
        key = (project, zone, instance["name"])
        self._assign_addresses(instance)
        self._instances[key] = instance
        if self._capacity.get(zone) is not None:
            self._capacity[zone] -= 1

        def status(value):
            def set_status():
                if self._instances.get(key) is instance and instance["status"] in (
                    "PROVISIONING",
                    "STAGING",
                ):
                    instance["status"] = value

            return set_status

        self._at(delay / 2, status("STAGING"))
        self._at(delay, status("RUNNING"))
        run = duration_seconds(instance["scheduling"].get("maxRunDuration"))
        if run is not None:
            self._at(run, lambda: self._terminate_by_cloud(*key, expect=instance))

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

    def insert_instance(self, project: str, zone: str, body: dict, rid: str | None, caller) -> dict:
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            replay = self._replay(project, rid)
            if replay:
                return replay
            instance = build_instance(
                project, zone, body, self._find_image, field="resource", bare_refs=False
            )
            if (project, zone, instance["name"]) in self._instances:
                raise already_exists(
                    f"projects/{project}/zones/{zone}/instances/{instance['name']}"
                )
            self._check_supported(zone, instance)
            failure = self._placement_error(project, zone, 1, instance)
            op = self._new_op(project, f"zones/{zone}", "insert", instance["selfLink"], caller, rid)
            delay = self.op_seconds
            if failure:
                self._at(delay, lambda: self._finish(op, *failure))
            else:
                op.resource["targetId"] = instance["id"]
                self._place(project, zone, instance, delay)
                self._at(delay, lambda: self._finish(op))
            return dict(op.resource)

    def bulk_insert(self, project: str, zone: str, body: dict, rid: str | None, caller) -> dict:
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            replay = self._replay(project, rid)
            if replay:
                return replay
            props = body.get("instanceProperties")
            if not props:
                raise invalid(
                    "resource.instanceProperties", "", "Required (no instance templates here)."
                )
            per = body.get("perInstanceProperties") or {}
            count = int(body.get("count") or len(per))
            min_count = int(body.get("minCount") or count)
            if count < 1 or not 1 <= min_count <= count or len(per) > count:
                raise invalid(
                    "resource.count",
                    count,
                    "Must be at least 1, >= minCount and >= the named instances.",
                )
            names = list(per)
            pattern = body.get("namePattern")
            if len(names) < count:
                if not pattern or not re.fullmatch(r"[a-z][-a-z0-9]*#{1,18}[-a-z0-9]*", pattern):
                    raise invalid(
                        "resource.namePattern", pattern or "", "Must hold one run of '#' (1 to 18)."
                    )
                names += self._pattern_names(project, zone, pattern, count - len(names), set(names))
            instances = []
            for name in names:
                one = dict(props, name=name)
                if (per.get(name) or {}).get("hostname"):
                    one["hostname"] = per[name]["hostname"]
                inst = build_instance(
                    project, zone, one, self._find_image, "resource.instanceProperties", True
                )
                if (project, zone, name) in self._instances:
                    raise already_exists(f"projects/{project}/zones/{zone}/instances/{name}")
                instances.append(inst)
            self._check_supported(zone, instances[0])
            cap = self._capacity.get(zone)
            fit = count if cap is None else min(count, cap)
            failure = self._placement_error(project, zone, count, instances[0])
            if failure and failure[0]["code"].startswith("ZONE_RESOURCE") and fit >= min_count:
                failure = None  # minCount is met: make what fits
            elif failure:
                fit = 0
            target = f"{API}/projects/{project}/zones/{zone}/instances"
            op = self._new_op(project, f"zones/{zone}", "bulkInsert", target, caller, rid)
            status = {
                "status": "CREATING",
                "targetVmCount": count,
                "createdVmCount": 0,
                "failedToCreateVmCount": 0,
                "deletedVmCount": 0,
            }
            op.resource["instancesBulkInsertOperationMetadata"] = {
                "perLocationStatus": {f"zones/{zone}": status}
            }
            delay = self.op_seconds
            for inst in instances[:fit]:
                self._place(project, zone, inst, delay)

            def done():
                status.update(status="DONE", createdVmCount=fit, failedToCreateVmCount=count - fit)
                self._finish(op, *(failure or (None, (None, None))))

            self._at(delay, done)
            return dict(op.resource)

    def _pattern_names(self, project, zone, pattern, n, taken) -> list[str]:
        """GCE's rule: numbering starts after the highest existing match of the pattern."""
        run = re.search(r"#+", pattern)
        width, head, tail = len(run.group()), pattern[: run.start()], pattern[run.end() :]
        rx = re.compile(re.escape(head) + rf"(\d{{{width}}})" + re.escape(tail))
        top = 0
        for p, z, name in list(self._instances) + [(project, zone, t) for t in taken]:
            m = rx.fullmatch(name) if (p, z) == (project, zone) else None
            if m:
                top = max(top, int(m.group(1)))
        return [f"{head}{i:0{width}d}{tail}" for i in range(top + 1, top + 1 + n)]

    def get_instance(self, project: str, zone: str, name: str) -> dict:
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            inst = self._instances.get((project, zone, name))
            if inst is None:
                raise not_found(f"projects/{project}/zones/{zone}/instances/{name}")
            return dict(inst)

    def delete_instance(self, project: str, zone: str, name: str, rid: str | None, caller) -> dict:
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            replay = self._replay(project, rid)
            if replay:
                return replay
            key = (project, zone, name)
            inst = self._instances.get(key)
            if inst is None:
                raise not_found(f"projects/{project}/zones/{zone}/instances/{name}")
            op = self._new_op(project, f"zones/{zone}", "delete", inst["selfLink"], caller, rid)
            op.resource["targetId"] = inst["id"]
            inst["status"] = "STOPPING"

            def gone():
                if self._instances.get(key) is inst:
                    self._release_addresses(inst)
                    del self._instances[key]
                self._finish(op)

            self._at(self.op_seconds, gone)
            return dict(op.resource)

    def list_instances(self, project: str, zone: str, query: dict) -> dict:
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            items = [
                i for (p, z, _), i in sorted(self._instances.items()) if (p, z) == (project, zone)
            ]
            page, token = _page(_filtered(items, query), query)
            out = {
                "kind": "compute#instanceList",
                "id": f"projects/{project}/zones/{zone}/instances",
                "selfLink": f"{API}/projects/{project}/zones/{zone}/instances",
            }
            if page:
                out["items"] = [dict(i) for i in page]
            if token:
                out["nextPageToken"] = token
            return out

    def aggregated_instances(self, project: str, query: dict) -> dict:
        with self._cond:
            self._advance()
            items = [
                i
                for (p, _, _), i in sorted(
                    self._instances.items(), key=lambda kv: (kv[0][1], kv[0][2])
                )
                if p == project
            ]
            page, token = _page(_filtered(items, query), query)
            scopes: dict[str, dict] = {}
            for zone in self._zones:
                found = [dict(i) for i in page if last(i["zone"]) == zone]
                if found:
                    scopes[f"zones/{zone}"] = {"instances": found}
                else:
                    scopes[f"zones/{zone}"] = {
                        "warning": {
                            "code": "NO_RESULTS_ON_PAGE",
                            "message": f"There are no results for scope 'zones/{zone}' "
                            "on this page.",
                            "data": [{"key": "scope", "value": f"zones/{zone}"}],
                        }
                    }
            out = {
                "kind": "compute#instanceAggregatedList",
                "id": f"projects/{project}/aggregated/instances",
                "items": scopes,
                "selfLink": f"{API}/projects/{project}/aggregated/instances",
            }
            if token:
                out["nextPageToken"] = token
            return out

    # -- firewalls ----------------------------------------------------------------------
    def insert_firewall(self, project: str, body: dict, rid: str | None, caller) -> dict:
        with self._cond:
            self._advance()
            replay = self._replay(project, rid)
            if replay:
                return replay
            fw = build_firewall(project, body)
            name = fw["name"]
            if (project, name) in self._firewalls:
                raise already_exists(f"projects/{project}/global/firewalls/{name}")
            self._firewalls[(project, name)] = fw
            op = self._new_op(project, "global", "insert", fw["selfLink"], caller, rid)
            op.resource["targetId"] = fw["id"]
            self._at(self.op_seconds, lambda: self._finish(op))
            return dict(op.resource)

    def patch_firewall(self, project: str, name: str, body: dict, rid: str | None, caller):
        """JSON merge patch of a rule, as firewalls.patch does; the name cannot change."""
        with self._cond:
            self._advance()
            replay = self._replay(project, rid)
            if replay:
                return replay
            fw = self._firewalls.get((project, name))
            if fw is None:
                raise not_found(f"projects/{project}/global/firewalls/{name}")
            if body.get("name", name) != name:
                raise invalid("resource.name", body["name"], "A rule cannot be renamed.")
            merged = build_firewall(project, {**fw, **body})
            merged.update(id=fw["id"], creationTimestamp=fw["creationTimestamp"])
            self._firewalls[(project, name)] = merged
            op = self._new_op(project, "global", "patch", fw["selfLink"], caller, rid)
            op.resource["targetId"] = fw["id"]
            self._at(self.op_seconds, lambda: self._finish(op))
            return dict(op.resource)

    def get_firewall(self, project: str, name: str) -> dict:
        with self._cond:
            self._advance()
            fw = self._firewalls.get((project, name))
            if fw is None:
                raise not_found(f"projects/{project}/global/firewalls/{name}")
            return dict(fw)

    def delete_firewall(self, project: str, name: str, rid: str | None, caller) -> dict:
        with self._cond:
            self._advance()
            replay = self._replay(project, rid)
            if replay:
                return replay
            fw = self._firewalls.get((project, name))
            if fw is None:
                raise not_found(f"projects/{project}/global/firewalls/{name}")
            op = self._new_op(project, "global", "delete", fw["selfLink"], caller, rid)
            op.resource["targetId"] = fw["id"]

            def gone():
                if self._firewalls.get((project, name)) is fw:
                    del self._firewalls[(project, name)]
                self._finish(op)

            self._at(self.op_seconds, gone)
            return dict(op.resource)

    def list_firewalls(self, project: str, query: dict) -> dict:
        with self._cond:
            self._advance()
            items = [f for (p, _), f in sorted(self._firewalls.items()) if p == project]
            page, token = _page(_filtered(items, query), query)
            out = {
                "kind": "compute#firewallList",
                "id": f"projects/{project}/global/firewalls",
                "selfLink": f"{API}/projects/{project}/global/firewalls",
            }
            if page:
                out["items"] = [dict(f) for f in page]
            if token:
                out["nextPageToken"] = token
            return out

    # -- images, zones, regions ---------------------------------------------------------
    def image_from_family(self, project: str, family: str) -> dict:
        with self._cond:
            return dict(self._image_from_family(project, family))

    def get_image(self, project: str, name: str) -> dict:
        with self._cond:
            return dict(self._find_image(f"projects/{project}/global/images/{name}"))

    def get_zone(self, project: str, zone: str) -> dict:
        self._known_zone(project, zone)
        return zone_resource(project, zone, self._zone_ids[zone])

    def list_zones(self, project: str, query: dict) -> dict:
        items = [zone_resource(project, z, self._zone_ids[z]) for z in self._zones]
        page, token = _page(_filtered(items, query), query)
        out = {
            "kind": "compute#zoneList",
            "id": f"projects/{project}/zones",
            "items": page,
            "selfLink": f"{API}/projects/{project}/zones",
        }
        if token:
            out["nextPageToken"] = token
        return out

    def _region(self, project: str, region: str) -> dict:
        zones = [z for z in self._zones if region_of(z) == region]
        return region_resource(project, region, zones, self._region_ids[region])

    def get_region(self, project: str, region: str) -> dict:
        if region not in self._region_ids:
            raise not_found(f"projects/{project}/regions/{region}")
        return self._region(project, region)

    def list_regions(self, project: str, query: dict) -> dict:
        items = [self._region(project, r) for r in sorted(self._region_ids)]
        page, token = _page(_filtered(items, query), query)
        out = {
            "kind": "compute#regionList",
            "id": f"projects/{project}/regions",
            "items": page,
            "selfLink": f"{API}/projects/{project}/regions",
        }
        if token:
            out["nextPageToken"] = token
        return out


def _filtered(items: list[dict], query: dict) -> list[dict]:
    try:
        pred = compile_filter(query.get("filter"))
    except FilterError as e:
        raise invalid(
            "filter", query.get("filter"), f"Invalid list filter expression: {e}"
        ) from None
    return [i for i in items if pred(i)]


def _page(items: list[dict], query: dict) -> tuple[list[dict], str | None]:
    """maxResults (0..500, default 500) and an opaque pageToken, as the API pages."""
    try:
        size = int(query.get("maxResults") or 500)
    except ValueError:
        raise invalid("maxResults", query.get("maxResults"), "Must be an integer.") from None
    if not 0 <= size <= 500:
        raise invalid("maxResults", size, "Must be between 0 and 500.")
    size = size or 500
    start = 0
    if query.get("pageToken"):
        try:
            start = int(base64.urlsafe_b64decode(query["pageToken"]).decode().split(":")[1])
        except (ValueError, IndexError):
            raise invalid("pageToken", query["pageToken"], "Invalid page token.") from None
    page = items[start : start + size]
    more = start + size < len(items)
    token = (
        base64.urlsafe_b64encode(f"offset:{start + size}:{fingerprint()}".encode()).decode()
        if more
        else None
    )
    return page, token
