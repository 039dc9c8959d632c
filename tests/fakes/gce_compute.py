"""The Compute API calls the fake answers: instances, firewalls, images, zones and regions,
each validated and answered as GCE does (an operation for every change, errors in its format)."""

from __future__ import annotations

import re

from .gce_catalog import region_resource, zone_resource
from .gce_filter import paginate, select
from .gce_model import (
    API,
    already_exists,
    build_firewall,
    build_instance,
    duration_seconds,
    invalid,
    last,
    not_found,
    now_rfc3339,
    region_of,
    resolve_partial,
)
from .gce_state import ComputeState


class Compute(ComputeState):
    """The fake Compute API: state plus the calls (gce_server routes requests here)."""

    # -- images -------------------------------------------------------------------------
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

    # -- instances ----------------------------------------------------------------------
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
        if self._reclaim.get(zone, 0) > 0:  # reclaimed while STAGING: never RUNNING
            self._reclaim[zone] -= 1
            self._at(delay * 0.75, lambda: self._terminate_by_cloud(*key, expect=instance))
        self._at(delay, status("RUNNING"))
        run = duration_seconds(instance["scheduling"].get("maxRunDuration"))
        if run is not None:
            self._at(run, lambda: self._terminate_by_cloud(*key, expect=instance))

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

            def place():
                for inst in instances[:fit]:
                    self._place(project, zone, inst, delay)

            if self.late_bulk_instances:  # GCE makes them as the operation runs
                self._at(delay, place)
            else:
                place()

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
            return dict(self._instance(project, zone, name))

    def delete_instance(self, project: str, zone: str, name: str, rid: str | None, caller) -> dict:
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            replay = self._replay(project, rid)
            if replay:
                return replay
            key = (project, zone, name)
            inst = self._instance(project, zone, name)
            op = self._new_op(project, f"zones/{zone}", "delete", inst["selfLink"], caller, rid)
            op.resource["targetId"] = inst["id"]
            failure = self._throttled(project, zone)
            if failure:  # accepted, then refused: the VM stays as it was
                self._at(self.op_seconds, lambda: self._finish(op, *failure))
                return dict(op.resource)
            inst["status"] = "STOPPING"

            def gone():
                if self._instances.get(key) is inst:
                    self._release_addresses(inst)
                    del self._instances[key]
                self._finish(op)

            self._at(self.op_seconds, gone)
            return dict(op.resource)

    def stop_instance(self, project: str, zone: str, name: str, rid: str | None, caller) -> dict:
        """STOPPING, then TERMINATED with its disks kept and its external address released."""
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            replay = self._replay(project, rid)
            if replay:
                return replay
            inst = self._instance(project, zone, name)
            op = self._new_op(project, f"zones/{zone}", "stop", inst["selfLink"], caller, rid)
            op.resource["targetId"] = inst["id"]
            if inst["status"] != "TERMINATED":
                inst["status"] = "STOPPING"

            def stopped():
                if inst["status"] == "STOPPING":
                    inst["status"] = "TERMINATED"
                    self._release_addresses(inst)
                self._finish(op)

            self._at(self.op_seconds, stopped)
            return dict(op.resource)

    def start_instance(self, project: str, zone: str, name: str, rid: str | None, caller) -> dict:
        """A stopped VM starts again (new external address) if the zone has room for it; a
        GPU VM may not: the operation then fails with ZONE_RESOURCE_POOL_EXHAUSTED."""
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            replay = self._replay(project, rid)
            if replay:
                return replay
            inst = self._instance(project, zone, name)
            op = self._new_op(project, f"zones/{zone}", "start", inst["selfLink"], caller, rid)
            op.resource["targetId"] = inst["id"]
            failure = None
            if inst["status"] == "TERMINATED":
                cap = self._capacity.get(zone)
                if cap is not None and cap < 1:
                    failure = self._placement_error(project, zone, 1, inst)
                else:
                    if cap is not None:
                        self._capacity[zone] -= 1
                    self._assign_public(inst)
                    inst["status"] = "STAGING"
            self._at(self.op_seconds, lambda: self._started(inst, op, failure))
            return dict(op.resource)

    def _started(self, inst: dict, op, failure) -> None:
        if inst["status"] == "STAGING":
            inst["status"] = "RUNNING"
            inst["lastStartTimestamp"] = now_rfc3339()
        self._finish(op, *(failure or (None, (None, None))))

    def _instance(self, project: str, zone: str, name: str) -> dict:
        inst = self._instances.get((project, zone, name))
        if inst is None:
            raise not_found(f"projects/{project}/zones/{zone}/instances/{name}")
        return inst

    def list_instances(self, project: str, zone: str, query: dict) -> dict:
        with self._cond:
            self._advance()
            self._known_zone(project, zone)
            items = [
                i for (p, z, _), i in sorted(self._instances.items()) if (p, z) == (project, zone)
            ]
            page = [dict(i) for i in select(items, query)]
            return list_page(
                "instanceList", f"projects/{project}/zones/{zone}/instances", page, query
            )

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
            page, token = paginate(select(items, query), query)
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
            op = self._new_op(project, "global", "insert", fw["selfLink"], caller, rid)
            failure = self._throttled(project, None)
            if failure:  # accepted, then refused: nothing made
                self._at(self.op_seconds, lambda: self._finish(op, *failure))
                return dict(op.resource)
            self._firewalls[(project, name)] = fw
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
            failure = self._throttled(project, None)
            if failure:  # accepted, then refused: the rule stays
                self._at(self.op_seconds, lambda: self._finish(op, *failure))
                return dict(op.resource)

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
            page = [dict(f) for f in select(items, query)]
            return list_page("firewallList", f"projects/{project}/global/firewalls", page, query)

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
        return list_page("zoneList", f"projects/{project}/zones", select(items, query), query)

    def _region(self, project: str, region: str) -> dict:
        zones = [z for z in self._zones if region_of(z) == region]
        return region_resource(project, region, zones, self._region_ids[region])

    def get_region(self, project: str, region: str) -> dict:
        if region not in self._region_ids:
            raise not_found(f"projects/{project}/regions/{region}")
        return self._region(project, region)

    def list_regions(self, project: str, query: dict) -> dict:
        items = [self._region(project, r) for r in sorted(self._region_ids)]
        return list_page("regionList", f"projects/{project}/regions", select(items, query), query)


def list_page(kind: str, path: str, items: list[dict], query: dict) -> dict:
    """One page of a list response, as the API shapes it: `items` only when the page has
    some, `nextPageToken` only when more follow."""
    page, token = paginate(items, query)
    out: dict = {"kind": f"compute#{kind}", "id": path, "selfLink": f"{API}/{path}"}
    if page:
        out["items"] = page
    if token:
        out["nextPageToken"] = token
    return out
