"""AWS EC2: GPU instances on demand or spot, secure by default, found again by tag.

One RunInstances call per attempt (MinCount = MaxCount: all or nothing), with a ClientToken
derived from the cluster and the attempt. Every resource carries the cluster's tags. Errors
become the typed ones the engine's failover reads (api.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mlcloud.providers.aws import iam, prices
from mlcloud.providers.aws.api import (
    ANY_CLUSTER,
    CREDENTIAL_ENVS,
    HOW_TO_CONFIGURE,
    Api,
    by_cluster,
    check_instance_type,
    check_region,
    sdk_errors,
    tagged,
)
from mlcloud.providers.aws.images import DEFAULT_USER, Images
from mlcloud.providers.aws.network import Network
from mlcloud.providers.base import (
    PYTHONS,
    AuthError,
    Capabilities,
    ClusterRef,
    Node,
    NodeStatus,
    Prepared,
    ProvisionRequest,
    Quote,
    SshOptions,
)

from mlcloud.errors import UsageError
from mlcloud.remote.ssh import SshTarget, SshTransport

if TYPE_CHECKING:
    from mlcloud.providers.base import Resource

DISK_GB = 200
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
# EC2's instance states as mlcloud's
STATUS: dict[str, NodeStatus] = {
    "pending": "pending",
    "running": "running",
    "shutting-down": "stopping",
    "stopping": "stopping",
    "stopped": "stopped",
    "terminated": "terminated",
}


class AwsProvider:
    name: ClassVar[str] = "aws"
    boot_timeout: ClassVar[float] = 600.0
    # its nodes terminate when they shut down (InstanceInitiatedShutdownBehavior)
    capabilities: ClassVar[Capabilities] = Capabilities(spot=True, owns_machines=True)
    pythons: ClassVar[tuple[str, ...]] = PYTHONS

    def __init__(self) -> None:
        self.api = Api()
        self.network = Network(self.api)
        self.images = Images(self.api)
        self.iam = iam.Iam(self.api)  # the cluster roles for bucket access
        self._pg_warned = False
        self._storage_warned = False

    def default_region(self) -> str | None:
        return self.api.region()

    def configured(self) -> bool:
        home = Path(os.environ.get("HOME", "~")).expanduser()
        files = (
            os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials",
            os.environ.get("AWS_CONFIG_FILE") or home / ".aws" / "config",
        )
        return any(os.environ.get(v) for v in CREDENTIAL_ENVS) or any(
            Path(f).is_file() for f in files
        )

    def check(self, request: ProvisionRequest) -> None:
        with sdk_errors("credentials", None):
            credentials = self.api.session.get_credentials()  # local: env, files, SSO cache
        if credentials is None:
            raise AuthError(f"no usable AWS credentials: {HOW_TO_CONFIGURE}")
        check_region(self.api.region(request.region))
        for r in request.fallback_regions:
            check_region(r)
        if request.hosts:
            raise UsageError("hosts are for the ssh provider; drop them or use --provider ssh")
        if not request.instance_type:
            raise UsageError(
                "aws needs an instance type: --instance-type g5.xlarge, "
                "resources.instance_type, or --gpus A100:8 to let the catalog pick"
            )
        check_instance_type(request.instance_type)

    def placements(self, request: ProvisionRequest) -> list[tuple[str | None, str | None]]:
        """The asked zone; else every available zone of the region, then of each fallback
        region (the catalog's next cheapest), in order."""
        region = self.api.region(request.region)
        if request.zone:
            return [(region, request.zone)]
        places: list[tuple[str | None, str | None]] = []
        for r in [region, *(f for f in request.fallback_regions if f != region)]:
            out = self.api.call(
                r,
                "describe_availability_zones",
                Filters=[{"Name": "state", "Values": ["available"]}],
            )
            places += [(r, z) for z in sorted(z["ZoneName"] for z in out["AvailabilityZones"])]
        return places

    def prepare(self, cluster: ClusterRef, request: ProvisionRequest) -> Prepared:
        """Key pair, security group (repaired if a crash left it without its rules) and, for
        several nodes, a placement group; the image and its login user pinned."""
        region = self.api.region(request.region)
        request = self.images.pin(region, request)
        self.api.identity(region)
        self.network.key_pair(cluster, region, request.ssh)
        self.network.security_group(cluster, region, request.ssh)
        warnings = () if self._storage_warned else _storage_warnings(request)
        self._storage_warned |= bool(warnings)  # once, not again for each zone tried
        if iam.policy(request.storage, region):
            name = iam.name_of(cluster.uid)
            self.iam.ensure(cluster, request.storage, region, self.api.tags(cluster, name))
        if request.count > 1:
            warning = self.network.placement_group(cluster, region)
            if warning and not self._pg_warned:
                self._pg_warned = True
                warnings += (warning,)
        return Prepared(request, warnings)

    def create(self, cluster: ClusterRef, request: ProvisionRequest, count: int) -> list[Node]:
        region = self.api.region(request.region)
        image, root_device = self.images.image(region, request.image)
        sg = self.network.group_id(cluster, region)
        tags = self.api.tags(cluster, f"mlcloud-{cluster.name}")
        # one RunInstances tags its instances alike: each one's number is this one plus its
        # launch index (_describe)
        numbered = [*tags, {"Key": NUMBER_TAG, "Value": str(request.first_number)}]
        # EC2 answers a token it has seen with that launch's instances, even terminated ones,
        # and launches nothing. (place, count, already there, the first number) names the
        # try: a resumed `up` asks the recorded place again with the same numbers, so the
        # same token, and EC2 launches once; every replacement or growth has numbers of its
        # own (never given twice), so a token of its own. At most 64 characters (EC2's
        # limit): the uid (49 at most) and 14 hex digits.
        place = request.zone or region
        attempt = (
            f"{place}:{count}:{request.count - count}:{request.instance_type}:{request.spot}"
            f":{request.first_number}"
        )
        token = f"{cluster.uid}-{hashlib.sha256(attempt.encode()).hexdigest()[:14]}"
        placement: dict[str, str] = {}
        if request.zone:
            placement["AvailabilityZone"] = request.zone
        group = self.network.placement_of(cluster, region) if request.count > 1 else None
        if group:
            placement["GroupName"] = group
        params: dict[str, Any] = dict(
            ImageId=image,
            InstanceType=request.instance_type,
            MinCount=count,
            MaxCount=count,
            ClientToken=token,
            KeyName=f"mlcloud-{cluster.uid}",
            SecurityGroupIds=[sg],
            MetadataOptions={
                "HttpTokens": "required",
                "HttpEndpoint": "enabled",
                "HttpPutResponseHopLimit": 2,
            },
            BlockDeviceMappings=[
                {
                    "DeviceName": root_device,
                    "Ebs": {
                        "VolumeSize": request.disk_gb or DISK_GB,
                        "VolumeType": "gp3",
                        "Encrypted": True,
                        "DeleteOnTermination": True,
                    },
                }
            ],
            InstanceInitiatedShutdownBehavior="terminate",
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": numbered},
                {"ResourceType": "volume", "Tags": tags},
            ],
        )
        if placement:
            params["Placement"] = placement
        if iam.policy(request.storage, region):
            params["IamInstanceProfile"] = {"Name": iam.name_of(cluster.uid)}
        if request.spot:
            spot: dict[str, Any] = {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            }
            if request.max_price:
                spot["MaxPrice"] = f"{request.max_price:.4f}"
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        out = iam.launch_retrying(
            lambda: self.api.call(region, "run_instances", zone=request.zone, **params)
        )
        ids = [i["InstanceId"] for i in out["Instances"]]
        self.api.wait(region, ids, "instance_running")
        return [n for n in self._describe(cluster, region) if n.node_id in ids]

    def list(self, cluster: ClusterRef) -> list[Node]:
        return self._describe(cluster, self.api.region(cluster.region))

    def spares(self, cluster: ClusterRef) -> int | None:
        return None  # capacity is found by asking EC2

    def terminate(self, cluster: ClusterRef, nodes: list[Node]) -> None:
        if not nodes:
            return
        region = self.api.region(cluster.region)
        ids = [n.node_id for n in nodes]
        self.api.call(region, "terminate_instances", InstanceIds=ids)
        self.api.wait(region, ids, "instance_terminated")
        from mlcloud.remote import keys

        keys.forget(ids)

    def cleanup(self, cluster: ClusterRef) -> None:
        self.network.delete(cluster, self.api.region(cluster.region))
        self.iam.delete(cluster.uid)  # after the instances that used it are gone

    def transport(
        self, cluster: ClusterRef, node: Node, label: str, ssh: SshOptions
    ) -> SshTransport:
        from mlcloud.remote import keys

        identity = ssh.identity_file or str(keys.cluster_key_path(cluster.uid))
        return SshTransport(
            SshTarget(
                host=node.ip,
                port=ssh.port or 22,
                user=ssh.user or DEFAULT_USER,
                identity_file=identity,
                proxy_command=ssh.proxy_command,
                host_key_id=node.node_id,
                python=ssh.python or "python3",
            ),
            label,
        )

    def prices(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        return prices.on_demand(self.api, pairs)

    def quotes(self, pairs: list[tuple[str, str]], spot: bool) -> list[Quote]:
        if spot:
            return [Quote(*key, usd) for key, usd in prices.spot_by_zone(self.api, pairs).items()]
        return [Quote(t, r, None, usd) for (t, r), usd in prices.on_demand(self.api, pairs).items()]

    # garbage collection

    def discover(self, region: str | None) -> list[Resource]:
        """Everything in the region that carries mlcloud's tags, live instances first."""
        region = self.api.region(region)
        found = [
            tagged("instance", i["InstanceId"], i.get("Tags"), region, i.get("LaunchTime"))
            for r in self.api.paged(
                region,
                "describe_instances",
                "Reservations",
                Filters=ANY_CLUSTER + [{"Name": "instance-state-name", "Values": LIVE_STATES}],
            )
            for i in r["Instances"]
        ]
        return found + self.network.discover(region) + self.iam.discover(region)

    def delete(self, resources: list[Resource]) -> None:
        """Delete what discover() found: instances first (and wait), then what they used."""
        by_region: dict[str, list[Resource]] = {}
        for r in resources:
            by_region.setdefault(r.region, []).append(r)
        for region, items in by_region.items():
            ids = [r.id for r in items if r.kind == "instance"]
            if ids:
                self.api.call(region, "terminate_instances", InstanceIds=ids)
                self.api.wait(region, ids, "instance_terminated")
            self.network.delete_found(region, items)
            self.iam.delete_found(items)

    def recorded(self, cluster: ClusterRef) -> ProvisionRequest | None:
        return None  # the tags tell all

    def _describe(self, cluster: ClusterRef, region: str) -> list[Node]:
        instances = [
            i
            for r in self.api.paged(
                region,
                "describe_instances",
                "Reservations",
                Filters=by_cluster(cluster)
                + [{"Name": "instance-state-name", "Values": LIVE_STATES}],
            )
            for i in r["Instances"]
        ]
        instances.sort(key=lambda i: (i["LaunchTime"], i.get("AmiLaunchIndex", 0), i["InstanceId"]))
        return [
            Node(
                i["InstanceId"],
                i.get("PublicIpAddress") or i.get("PrivateIpAddress", ""),
                i.get("PrivateIpAddress", ""),
                f"~/.mlcloud/{cluster.uid}/{_directory(i)}",
                STATUS[i["State"]["Name"]],
            )
            for i in instances
        ]


def _storage_warnings(request: ProvisionRequest) -> tuple[str, ...]:
    return tuple(
        f"storage {uri}: an AWS cluster's nodes get credentials for S3 only, none for this "
        "bucket; grant them access yourself or use an s3:// bucket"
        for uri in iam.other_cloud(request.storage)
    )


NUMBER_TAG = "mlcloud-node"  # the number of the first node its RunInstances made


def _directory(instance: dict) -> str:
    """The node's directory: `node-K`, K its number (the launch's first plus its launch
    index); an instance made before nodes were numbered keeps its id."""
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags") or []}
    first = tags.get(NUMBER_TAG, "")
    if not first.isdigit():
        return instance["InstanceId"]
    return f"node-{int(first) + int(instance.get('AmiLaunchIndex', 0))}"
