"""Google Compute Engine: GPU VMs on demand or Spot, found again by label.

One bulkInsert per attempt (minCount = count: all or nothing) with a request id fixed by the
cluster and the attempt, waited on explicitly; firewall rules by a network tag unique to the
cluster. The API calls of an `up` do not grow with the node count; `down` deletes VMs one call
each (GCE has no bulk delete) and confirms with one listing.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from mlcloud.providers import caller
from mlcloud.providers.base import (
    GONE,
    PENDING,
    PYTHONS,
    RUNNING,
    Capabilities,
    CapacityError,
    ClusterRef,
    Node,
    NodeStatus,
    Prepared,
    ProviderError,
    ProvisionRequest,
    QuotaError,
    Quote,
    Resource,
    SshOptions,
)
from mlcloud.providers.gce import accounts, rules

from mlcloud.errors import UsageError
from mlcloud.remote.ssh import SshTarget, SshTransport

if TYPE_CHECKING:
    from mlcloud.providers.gce.api import Api

ENDPOINT_ENV = "MLCLOUD_GCE_API_ENDPOINT"
PROJECT_ENVS = ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT")
REGION_ENVS = ("CLOUDSDK_COMPUTE_REGION", "GOOGLE_CLOUD_REGION")
RUNNING_TIMEOUT_S = 600.0
GONE_TIMEOUT_S = 600.0
POLLS_S = (0.2, 0.5, 1.0, 2.0)  # between listings: quick at first, then every 2 s
REASK_S = 15.0  # a VM still RUNNING this long after its deletion was asked is asked again
# GCE's instance states as mlcloud's (TERMINATED is GCE's word for a VM powered off)
STATUS: dict[str, NodeStatus] = {
    "PENDING": "pending",
    "PROVISIONING": "pending",
    "STAGING": "pending",
    "REPAIRING": "pending",
    "RUNNING": "running",
    "PENDING_STOP": "stopping",
    "STOPPING": "stopping",
    "SUSPENDING": "stopping",
    "DEPROVISIONING": "stopping",
    "STOPPED": "stopped",
    "SUSPENDED": "stopped",
    "TERMINATED": "stopped",
}


@dataclass(frozen=True)
class Settings:
    """Where a cluster's resources live: kept per cluster, so `down` in another shell (with
    another default project) finds them."""

    project: str | None = None
    api_endpoint: str | None = None


class GceProvider:
    name: ClassVar[str] = "gce"
    boot_timeout: ClassVar[float] = 900.0  # the driver install on first boot takes minutes
    # maxRunDuration: GCE deletes the VMs at the budget's deadline whatever runs on them
    capabilities: ClassVar[Capabilities] = Capabilities(
        spot=True, self_deadline=True, owns_machines=True
    )
    pythons: ClassVar[tuple[str, ...]] = PYTHONS

    def __init__(self) -> None:
        self._apis: dict[tuple[str, str | None], Api] = {}
        self._creds: tuple[Any, str | None] | None = None
        self._zones: dict[str, str] = {}  # VM name -> zone, as last listed
        self._storage_warned = False
        self._accounts: set[str] = set()  # uids whose service account this process made

    def default_region(self) -> str | None:
        return next((os.environ[e] for e in REGION_ENVS if os.environ.get(e)), None)

    def configured(self) -> bool:
        return rules.adc_present(os.environ)

    def _region(self, request: ProvisionRequest) -> str:
        zone = request.zone
        if zone and request.region and rules.region_of(zone) != request.region:
            raise UsageError(  # its VMs would be listed (and so deleted) in neither
                f"zone {zone} is not in region {request.region}; pass a zone of "
                f"{request.region}, or --region {rules.region_of(zone)}"
            )
        region = request.region or (rules.region_of(zone) if zone else self.default_region())
        if not region:
            raise UsageError(
                "no GCE region: pass --region (e.g. us-central1), set region: in the spec, "
                "or CLOUDSDK_COMPUTE_REGION"
            )
        return region

    def _credentials(self) -> tuple[Any, str | None]:
        if self._creds is None:
            from mlcloud.providers.gce.api import credentials

            self._creds = credentials()
        return self._creds

    def api(self, settings: Settings) -> Api:
        from mlcloud.providers.gce.api import Api

        endpoint = settings.api_endpoint or os.environ.get(ENDPOINT_ENV) or None
        creds, adc_project = self._credentials()
        project = (
            settings.project
            or next((os.environ[e] for e in PROJECT_ENVS if os.environ.get(e)), None)
            or adc_project
        )
        if not project:
            raise UsageError(
                "no Google Cloud project: set gce.project in the spec, GOOGLE_CLOUD_PROJECT, "
                "or `gcloud config set project ID`"
            )
        key = (project, endpoint)
        if key not in self._apis:
            self._apis[key] = Api(project, endpoint, creds)
        return self._apis[key]

    def _remember(self, cluster: ClusterRef, request: ProvisionRequest) -> Api:
        """The request's project and endpoint, kept for the cluster's later commands."""
        settings = Settings(request.project, request.api_endpoint)
        path = _settings_path(cluster.uid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings.__dict__))
        tmp.replace(path)
        return self.api(settings)

    def _api_of(self, cluster: ClusterRef) -> Api:
        try:
            saved = json.loads(_settings_path(cluster.uid).read_text())
        except (OSError, ValueError):
            saved = {}
        return self.api(Settings(saved.get("project"), saved.get("api_endpoint")))

    # the contract

    def check(self, request: ProvisionRequest) -> None:
        self.api(Settings(request.project, request.api_endpoint))
        self._region(request)
        if request.hosts:
            raise UsageError("hosts are for the ssh provider; drop them or use --provider ssh")
        if not request.instance_type:
            raise UsageError(
                "gce needs a machine type: --instance-type n1-standard-8+T4:1, "
                "resources.instance_type, or --gpus A100:8 to let the catalog pick"
            )
        if request.max_price is not None:
            raise UsageError(
                "spot_max_price: GCE Spot VMs have no bid price; drop it (Spot is priced by GCE)"
            )
        rules.split_type(request.instance_type)  # a malformed type: one line, before anything

    def placements(self, request: ProvisionRequest) -> list[tuple[str | None, str | None]]:
        """The asked zone; else the zones the catalog lists for the type in the region (the
        Zones API when it lists none), then those of each fallback region, in order. A zone or
        region GCE does not know is bad input, said before anything is made."""
        from mlcloud.providers.gce.api import NotFound

        region = self._region(request)
        api = self.api(Settings(request.project, request.api_endpoint))
        how = f"in project {api.project}; pick one of `gcloud compute"
        if request.zone:
            try:
                api.call("zones", "get", None, project=api.project, zone=request.zone)
            except NotFound:
                raise UsageError(f"no GCE zone {request.zone!r} {how} zones list`") from None
            return [(region, request.zone)]
        places: list[tuple[str | None, str | None]] = []
        for r in [region, *(f for f in request.fallback_regions if f != region)]:
            zones = _catalog_zones(request.instance_type or "", r)
            if not zones:
                listed = api.paged("zones", "list", project=api.project)
                known = [z for z in listed if z.name.startswith(f"{r}-")]
                if not known:  # not "no capacity in any place tried"
                    raise UsageError(f"no GCE region {r!r} {how} regions list`")
                zones = sorted(z.name for z in known if z.status == "UP")
            places += [(r, z) for z in zones]
        return places

    def prepare(self, cluster: ClusterRef, request: ProvisionRequest) -> Prepared:
        """Firewall rules (SSH from the caller, all traffic within the cluster's tag), the
        image (the newest Deep Learning VM of the family) and login user pinned."""
        api = self._remember(cluster, request)
        request = replace(
            request, ssh=replace(request.ssh, user=request.ssh.user or rules.DEFAULT_USER)
        )
        project, name, family = rules.image_ref(request.image, api.project)
        if family:  # pinned to the family's newest image, for a resumed `up`
            name = self._image_from_family(api, project, family)
        request = replace(request, image=name)
        endpoint = api.endpoint or "https://compute.googleapis.com"
        cidrs = list(request.ssh.allowed_cidrs) or [caller.cidr(endpoint)]
        for body in rules.firewalls(cluster.uid, cluster.owner, cidrs):
            self._firewall(api, body)
        warnings: tuple[str, ...] = ()
        if accounts.wanted(request.storage) and cluster.uid not in self._accounts:
            said = self._account_api(api).ensure(
                cluster.uid, cluster.name, cluster.owner, request.storage
            )
            self._accounts.add(cluster.uid)  # once, not again for each zone tried
            warnings += tuple(said)
        uris = () if self._storage_warned else (*request.storage.write, *request.storage.read)
        other = rules.storage_warnings(uris)
        self._storage_warned |= bool(other)
        return Prepared(request, warnings + other)

    def _account_api(self, api: Api) -> accounts.Accounts:
        return accounts.Accounts(self._credentials()[0], api.project)

    def create(self, cluster: ClusterRef, request: ProvisionRequest, count: int) -> list[Node]:
        api = self._api_of(cluster)
        region = self._region(request)
        zone = request.zone
        if not zone:
            raise ProviderError("gce: create needs a zone (from placements)")
        assert request.image and request.instance_type
        taken = {n.node_id for n in self._list(api, cluster, None)}
        names = []
        k = request.first_number  # a VM's name carries its number (its root's `node-K`)
        while len(names) < count:
            if rules.instance_name(cluster.uid, k) not in taken:
                names.append(rules.instance_name(cluster.uid, k))
            k += 1
        from mlcloud.remote import keys

        public = (
            caller.public_key(request.ssh.identity_file)
            if request.ssh.identity_file
            else " ".join(keys.ensure_cluster_key(cluster.uid)[1].split()[:2])  # no comment
        )
        props = rules.instance_properties(
            instance_type=request.instance_type,
            image=request.image,
            disk_gb=request.disk_gb,
            labels=rules.labels(cluster.uid, cluster.name, cluster.owner),
            tag=rules.tag(cluster.uid),
            user=request.ssh.user or rules.DEFAULT_USER,
            public_key=public,
            spot=request.spot,
            max_run_s=rules.max_run_seconds(request.deadline, time.time()),
            account=(
                accounts.email(cluster.uid, api.project)
                if accounts.wanted(request.storage)
                else None
            ),
        )
        body = {
            "count": count,
            "min_count": count,
            "per_instance_properties": {n: {"name": n} for n in names},
            "instance_properties": props,
        }
        try:
            api.retry_throttled(lambda: self._insert(api, cluster, zone, region, request, body))
            return self._until_running(api, cluster, zone, set(names))
        except Exception:
            # all or nothing, and only this attempt's VMs (by name): never a VM that was there
            # before it, in this zone or any (a refused grow leaves the cluster as it was)
            self._delete_named(api, cluster, names)
            raise

    def _insert(
        self,
        api: Api,
        cluster: ClusterRef,
        zone: str,
        region: str,
        request: ProvisionRequest,
        body: dict,
    ) -> None:
        """One bulkInsert, waited on. Its request id is fixed by the cluster, the zone and the
        VM names (their numbers are never given twice), so a resumed command sends the same
        one; an attempt GCE answered is counted, and the same names asked again (a retry
        after a throttled operation) are a new request: GCE replays an id's answer for an
        hour."""
        from mlcloud.providers.gce.api import OperationThrottled

        from mlcloud.state import atomic

        names = list(body["per_instance_properties"])
        attempt = f"{zone}:{','.join(names)}:{request.instance_type}:{request.spot}"
        answered = _settings_path(cluster.uid).with_suffix(".answered")
        tried = answered.read_text().splitlines() if answered.exists() else []
        attempt += f"#{tried.count(attempt)}"
        pending = _settings_path(cluster.uid).with_suffix(".pending")
        op = api.call(
            "instances",
            "bulk_insert_unary",
            zone,
            project=api.project,
            zone=zone,
            request_id=rules.request_id(cluster.uid, attempt),
            bulk_insert_instance_resource_resource=body,
        )
        # VMs come as it runs: an `up` killed now leaves `down` to wait, then delete them
        atomic.write(pending, json.dumps([zone, op.name, names]).encode())
        try:
            api.wait(op, zone, region)
        except (CapacityError, QuotaError, OperationThrottled):
            pending.unlink()
            _answered(answered, attempt)  # so the next try of these names is a new request
            raise
        pending.unlink()
        _answered(answered, attempt)

    def list(self, cluster: ClusterRef) -> list[Node]:
        return self._list(self._api_of(cluster), cluster, cluster.region)

    def spares(self, cluster: ClusterRef) -> int | None:
        return None  # capacity is found by asking GCE

    def terminate(self, cluster: ClusterRef, nodes: list[Node]) -> None:
        if not nodes:
            return
        api = self._api_of(cluster)
        names = {n.node_id for n in nodes}
        if not names <= self._zones.keys():  # the engine lists first: their zones are known
            self._zones.update({name: zone for zone, name in self._instances(api, cluster)})
        self._delete(api, [(name, self._zones[name]) for name in names if name in self._zones])
        self._until_gone(api, cluster, names)
        from mlcloud.remote import keys

        keys.forget(sorted(names))

    def cleanup(self, cluster: ClusterRef) -> None:
        api = self._api_of(cluster)
        pending = _settings_path(cluster.uid).with_suffix(".pending")
        if pending.exists():  # a bulkInsert whose `up` was killed: its VMs may come yet
            zone, op, *names = json.loads(pending.read_text())
            with suppress(ProviderError):  # failed or not (or forgotten), delete what it made
                op = api.call(
                    "zone_operations", "get", zone, project=api.project, zone=zone, operation=op
                )
                api.wait(op, zone, None)
            if not names:  # written by an older mlcloud: every VM of the cluster in the zone
                names = [[name for z, name in self._instances(api, cluster) if z == zone]]
            self._delete_named(api, cluster, names[0])
            pending.unlink()
        for name in rules.firewall_names(cluster.uid):
            self._delete_firewall(api, name)
        self._account_api(api).delete(cluster.uid)  # after the VMs that ran as it are gone
        self._accounts.discard(cluster.uid)
        _settings_path(cluster.uid).unlink(missing_ok=True)  # prepare writes it again

    def transport(
        self, cluster: ClusterRef, node: Node, label: str, ssh: SshOptions
    ) -> SshTransport:
        from mlcloud.remote import keys

        return SshTransport(
            SshTarget(
                host=node.ip,
                port=ssh.port or 22,
                user=ssh.user or rules.DEFAULT_USER,
                identity_file=ssh.identity_file or str(keys.cluster_key_path(cluster.uid)),
                proxy_command=ssh.proxy_command,
                host_key_id=node.node_id,
                python=ssh.python or "python3",
            ),
            label,
        )

    # garbage collection

    def discover(self, region: str | None) -> list[Resource]:
        """Every firewall rule and service account mlcloud made (global: listed whatever the
        region), then every labelled VM (in the region's zones, if one is named); a VM's id
        is zone/name."""
        api = self.api(Settings())
        found = [
            Resource("gce", "service-account", address, uid, uid.rpartition("-")[0], home, "global")
            for address, uid, home in self._account_api(api).discover()
        ]
        for f in api.paged("firewalls", "list", project=api.project):
            owner = rules.firewall_owner(f.description)
            if owner and f.name.startswith("mlcloud-"):
                uid, home = owner
                found.append(
                    Resource(
                        "gce",
                        "firewall",
                        f.name,
                        uid,
                        uid.rpartition("-")[0],
                        home,
                        "global",
                        created=rules.epoch(f.creation_timestamp),
                    )
                )
        for scope, i in api.paged(
            "instances", "aggregated_list", project=api.project, filter="labels.mlcloud-cluster:*"
        ):
            zone = scope.rpartition("/")[2]
            if region and not zone.startswith(f"{region}-"):
                continue
            found.append(
                Resource(
                    "gce",
                    "instance",
                    f"{zone}/{i.name}",
                    i.labels.get("mlcloud-cluster", ""),
                    i.labels.get("mlcloud-name", ""),
                    i.labels.get("mlcloud-owner", ""),
                    rules.region_of(zone),
                    created=rules.epoch(i.creation_timestamp),
                )
            )
        return found

    def delete(self, resources: list[Resource]) -> None:
        """VMs first (confirmed gone), then the firewall rules."""
        api = self.api(Settings())
        vms = [tuple(r.id.split("/", 1)) for r in resources if r.kind == "instance"]
        self._delete(api, [(name, zone) for zone, name in vms])
        deadline, polls = time.monotonic() + GONE_TIMEOUT_S, iter(POLLS_S)
        while vms and any(
            (scope.rpartition("/")[2], i.name) in vms
            for scope, i in api.paged(
                "instances",
                "aggregated_list",
                project=api.project,
                filter="labels.mlcloud-cluster:*",
            )
        ):
            if time.monotonic() > deadline:
                raise ProviderError("gce: VMs still not deleted; run `mlcloud gc` again")
            time.sleep(_pause(polls))
        for r in resources:
            if r.kind == "firewall":
                self._delete_firewall(api, r.id)
        for r in resources:
            if r.kind == "service-account":  # its grants first, then the account
                self._account_api(api).delete(r.cluster_uid)

    def recorded(self, cluster: ClusterRef) -> ProvisionRequest | None:
        return None  # its project and endpoint it reads again itself

    def prices(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        from mlcloud.providers.gce.billing import on_demand

        return on_demand(self._credentials()[0], pairs)

    def quotes(self, pairs: list[tuple[str, str]], spot: bool) -> list[Quote]:
        from mlcloud.providers.gce.billing import machines

        found = machines(self._credentials()[0], pairs, spot=spot)
        return [Quote(t, r, None, usd) for (t, r), usd in found.items()]

    # helpers

    def _instances(self, api: Api, cluster: ClusterRef) -> list[tuple[str, str]]:
        """(zone, name) of every VM of the cluster, wherever it is."""
        return [(zone, name) for zone, name, _ in self._states(api, cluster)]

    def _states(self, api: Api, cluster: ClusterRef) -> list[tuple[str, str, str]]:
        """(zone, name, GCE status) of every VM of the cluster, wherever it is."""
        return [
            (scope.rpartition("/")[2], i.name, i.status)
            for scope, i in api.paged(
                "instances",
                "aggregated_list",
                project=api.project,
                filter=rules.label_filter(cluster.uid),
            )
        ]

    def _list(self, api: Api, cluster: ClusterRef, region: str | None) -> list[Node]:
        found = []
        for scope, i in api.paged(
            "instances",
            "aggregated_list",
            project=api.project,
            filter=rules.label_filter(cluster.uid),
        ):
            zone = scope.rpartition("/")[2]
            self._zones[i.name] = zone
            if region and not zone.startswith(f"{region}-"):
                continue
            nic = i.network_interfaces[0] if i.network_interfaces else None
            private = nic.network_i_p if nic else ""
            public = nic.access_configs[0].nat_i_p if nic and nic.access_configs else ""
            found.append(
                Node(
                    i.name,
                    public or private,
                    private,
                    f"~/.mlcloud/{cluster.uid}/{rules.directory(cluster.uid, i.name)}",
                    STATUS.get(i.status, PENDING),  # a state new to mlcloud: not gone
                )
            )
        ours = f"mlcloud-{cluster.uid}-"  # by index, then other names (a clone keeps labels)
        return sorted(
            found, key=lambda n: (n.node_id[: len(ours)] != ours, len(n.node_id), n.node_id)
        )

    def _until_running(
        self, api: Api, cluster: ClusterRef, zone: str, names: set[str]
    ) -> list[Node]:
        """The VMs once all run; one that ended first (a Spot VM reclaimed while starting:
        deleted, or TERMINATED) means the zone could not keep it: CapacityError, so the
        engine tries the next zone."""
        deadline, polls = time.monotonic() + RUNNING_TIMEOUT_S, iter(POLLS_S)
        while True:
            nodes = [n for n in self._list(api, cluster, None) if n.node_id in names]
            if len(nodes) == len(names) and all(n.status == RUNNING and n.ip for n in nodes):
                return nodes
            ended = names - {n.node_id for n in nodes if n.status not in GONE}
            if ended:
                raise CapacityError(
                    zone,
                    f"GCE {zone}: VM(s) {', '.join(sorted(ended))} ended before running "
                    "(a Spot VM reclaimed while starting)",
                )
            if time.monotonic() > deadline:
                raise ProviderError(f"gce: VMs not running after {RUNNING_TIMEOUT_S:.0f} s")
            time.sleep(_pause(polls))

    def _until_gone(self, api: Api, cluster: ClusterRef, names: set[str]) -> None:
        """Return once none of these VMs is listed. One still RUNNING a while after its
        deletion was asked (its operation ended throttled) is asked again, backing off."""
        deadline, polls = time.monotonic() + GONE_TIMEOUT_S, iter(POLLS_S)
        wait = REASK_S
        again = time.monotonic() + wait
        while True:
            left = [
                (zone, name, st) for zone, name, st in self._states(api, cluster) if name in names
            ]
            if not left:
                return
            if time.monotonic() > deadline:
                raise ProviderError(
                    f"gce: VMs of {cluster.name} still not deleted after "
                    f"{GONE_TIMEOUT_S:.0f} s; run `mlcloud down` again"
                )
            if time.monotonic() > again:
                with suppress(ProviderError):  # the deadline above is the judge
                    self._delete(api, [(name, zone) for zone, name, st in left if st == "RUNNING"])
                wait *= 2
                again = time.monotonic() + wait
            time.sleep(_pause(polls))

    def _delete(self, api: Api, vms: list[tuple[str, str]]) -> None:
        """Ask for each VM's deletion (one call each, in parallel); the caller confirms."""
        from mlcloud.providers.gce.api import NotFound

        def one(vm: tuple[str, str]) -> None:
            name, zone = vm
            try:
                api.call(
                    "instances",
                    "delete_unary",
                    zone,
                    project=api.project,
                    zone=zone,
                    instance=name,
                    request_id=str(uuid.uuid4()),
                )
            except NotFound:
                pass

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, vms))

    def _delete_named(self, api: Api, cluster: ClusterRef, names: list[str]) -> None:
        """Delete the cluster's VMs of these names wherever they are (what one attempt made),
        and confirm they are gone."""
        left = [(name, z) for z, name in self._instances(api, cluster) if name in names]
        if not left:
            return
        self._delete(api, left)
        self._until_gone(api, cluster, {name for name, _ in left})

    def _firewall(self, api: Api, body: dict) -> None:
        """Make the rule; one that exists (a resumed `up`) has its sources widened to the
        caller's (a new address); sources are only ever added."""
        from mlcloud.providers.gce.api import AlreadyExists

        try:
            _change_firewall(api, "insert_unary", firewall_resource=body)
            return
        except AlreadyExists:
            have = api.call("firewalls", "get", None, project=api.project, firewall=body["name"])
        missing = set(body.get("source_ranges", [])) - set(have.source_ranges)
        if missing:
            wider = {"source_ranges": sorted(set(have.source_ranges) | missing)}
            _change_firewall(api, "patch_unary", firewall=body["name"], firewall_resource=wider)

    def _delete_firewall(self, api: Api, name: str) -> None:
        from mlcloud.providers.gce.api import NotFound

        with suppress(NotFound):
            _change_firewall(api, "delete_unary", firewall=name)

    def _image_from_family(self, api: Api, project: str, family: str) -> str:
        image = api.call("images", "get_from_family", None, project=project, family=family)
        return f"projects/{project}/global/images/{image.name}"


def _pause(polls) -> float:
    return next(polls, POLLS_S[-1])


def _settings_path(uid: str):
    from mlcloud.state import paths

    return paths.private_dir(paths.home() / "gce") / f"{uid}.json"


def _answered(path, attempt: str) -> None:
    """Attempts GCE answered, one per line: their request ids would get the old answer."""
    with path.open("a") as f:
        f.write(attempt.rpartition("#")[0] + "\n")


def _catalog_zones(instance_type: str, region: str) -> list[str]:
    from mlcloud.spec import catalog

    for o in catalog.load():
        if o.provider == "gce" and o.instance_type == instance_type and o.region == region:
            return list(o.zones)
    return []


def _change_firewall(api: Api, method: str, **request: Any) -> None:
    """Insert, patch or delete a firewall rule of the project, and wait for it. A fresh request
    id per try: the call's retries of a throttled request are applied once, and an operation
    that ends throttled is asked again as a new request."""

    def once() -> None:
        op = api.call(
            "firewalls", method, None, project=api.project, request_id=str(uuid.uuid4()), **request
        )
        api.wait(op, None, None)

    api.retry_throttled(once)
