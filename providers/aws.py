"""AWS EC2: GPU instances on demand or spot, secure by default, found again by tag.

One RunInstances call per attempt (MinCount = MaxCount: all or nothing), with a ClientToken
derived from the cluster and the attempt. Every resource carries the cluster's tags. Errors
become the typed ones the engine's failover reads. boto3 is imported only here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import time
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

from mlcloud.providers.base import (
    AuthError,
    CapacityError,
    ClusterRef,
    Node,
    ProviderError,
    ProvisionRequest,
    QuotaError,
    SshOptions,
)

from mlcloud.errors import UsageError
from mlcloud.remote.ssh import SshTarget, SshTransport

if TYPE_CHECKING:
    from mlcloud.providers.base import Resource

DEFAULT_USER = "ubuntu"  # the Deep Learning AMIs are Ubuntu
DISK_GB = 200
# Newest first by CreationDate; the OSS-driver PyTorch DLAMI is the one AWS maintains today.
DLAMI_NAMES = [
    "Deep Learning OSS Nvidia Driver AMI GPU PyTorch *",
    "Deep Learning AMI GPU PyTorch *",
]
CAPACITY_CODES = {
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientCapacity",
    "InsufficientReservedInstanceCapacity",
    "Unsupported",
    "SpotMaxPriceTooLow",
    "InsufficientFreeAddressesInSubnet",
    "UnfulfillableCapacity",
}
QUOTA_CODES = {
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "PendingVerification",
    "InsufficientAddressCapacity",
}
AUTH_CODES = {
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "RequestExpired",
    "OptInRequired",
}
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
HOW_TO_CONFIGURE = (
    "configure AWS credentials (`aws configure`, AWS_PROFILE, or "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and a region (AWS_REGION)"
)


class AwsProvider:
    name: ClassVar[str] = "aws"
    boot_timeout: ClassVar[float] = 600.0

    def __init__(self) -> None:
        self._session: Any = None
        self._clients: dict[str, Any] = {}
        self._sg_ids: dict[tuple[str, str], str] = {}  # (region, cluster uid) -> group id

    # boto3, lazily

    @property
    def session(self):
        if self._session is None:
            import boto3

            self._session = boto3.session.Session()
        return self._session

    def region(self, request_region: str | None = None) -> str:
        region = request_region or self.session.region_name
        if not region:
            raise UsageError(
                f"no AWS region: pass --region, set region: in the spec, or {HOW_TO_CONFIGURE}"
            )
        return region

    def client(self, region: str):
        if region not in self._clients:
            from botocore.config import Config

            self._clients[region] = self.session.client(
                "ec2",
                region_name=region,
                config=Config(
                    retries={"mode": "standard", "max_attempts": 6},
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
        return self._clients[region]

    def _call(self, region: str, op: str, zone: str | None = None, **kwargs) -> dict:
        """One EC2 call; botocore's standard mode retries throttling with jittered backoff."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            return getattr(self.client(region), op)(**kwargs)
        except (NoCredentialsError, PartialCredentialsError):
            raise AuthError(f"no usable AWS credentials: {HOW_TO_CONFIGURE}") from None
        except EndpointConnectionError as e:
            raise ProviderError(f"cannot reach EC2 in {region}: {e}") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            message = e.response.get("Error", {}).get("Message", "")
            where = f"{zone or region}"
            if code in CAPACITY_CODES:
                raise CapacityError(where, f"EC2 {where}: {code}: {message}") from None
            if code in QUOTA_CODES:
                raise QuotaError(
                    where,
                    f"EC2 quota in {where}: {code}: {message}; ask AWS "
                    "for a higher limit or pick another region",
                ) from None
            if code in AUTH_CODES:
                raise AuthError(
                    f"AWS refused the credentials ({code}: {message}); {HOW_TO_CONFIGURE}"
                ) from None
            raise ProviderError(f"EC2 {op} in {where} failed: {code}: {message}") from None
        except BotoCoreError as e:
            raise ProviderError(f"EC2 {op} in {region} failed: {e}") from None

    # the contract

    def check(self, request: ProvisionRequest) -> None:
        if self.session.get_credentials() is None:  # local lookup: env, files, SSO cache
            raise AuthError(f"no usable AWS credentials: {HOW_TO_CONFIGURE}")
        self.region(request.region)
        if request.hosts:
            raise UsageError("hosts are for the ssh provider; drop them or use --provider ssh")
        if not request.instance_type:
            raise UsageError(
                "aws needs an instance type: --instance-type g5.xlarge, "
                "resources.instance_type, or --gpus A100:8 to let the catalog pick"
            )

    def placements(self, request: ProvisionRequest) -> list[tuple[str | None, str | None]]:
        """The asked zone; else every available zone of the region, then of each fallback
        region (the catalog's next cheapest), in order."""
        region = self.region(request.region)
        if request.zone:
            return [(region, request.zone)]
        places: list[tuple[str | None, str | None]] = []
        for r in [region, *(f for f in request.fallback_regions if f != region)]:
            out = self._call(
                r,
                "describe_availability_zones",
                Filters=[{"Name": "state", "Values": ["available"]}],
            )
            places += [(r, z) for z in sorted(z["ZoneName"] for z in out["AvailabilityZones"])]
        return places

    def prepare(self, cluster: ClusterRef, request: ProvisionRequest) -> None:
        region = self.region(request.region)
        self._key_pair(cluster, region, request.ssh)
        self._security_group(cluster, region, request.ssh)
        if request.count > 1:
            self._placement_group(cluster, region)

    def create(self, cluster: ClusterRef, request: ProvisionRequest, count: int) -> list[Node]:
        region = self.region(request.region)
        image, root_device = self._image(region, request.image)
        sg = self._sg_ids.get((region, cluster.uid)) or self._find_security_group(cluster, region)
        tags = self._tags(cluster, f"mlcloud-{cluster.name}")
        # the engine asks for what is missing, so (place, count, already there) names the try
        attempt = f"{request.zone or region}:{count}:{request.count - count}"
        token = f"{cluster.uid}-{hashlib.sha256(attempt.encode()).hexdigest()[:16]}"
        placement: dict[str, str] = {}
        if request.zone:
            placement["AvailabilityZone"] = request.zone
        if request.count > 1:
            placement["GroupName"] = f"mlcloud-{cluster.uid}"
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
                {"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")
            ],
        )
        if placement:
            params["Placement"] = placement
        if request.spot:
            spot: dict[str, Any] = {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            }
            if request.max_price:
                spot["MaxPrice"] = f"{request.max_price:.4f}"
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        out = self._call(region, "run_instances", zone=request.zone, **params)
        ids = [i["InstanceId"] for i in out["Instances"]]
        self._wait(region, ids, "instance_running")
        return [n for n in self._describe(cluster, region) if n.node_id in ids]

    def list(self, cluster: ClusterRef) -> list[Node]:
        return self._describe(cluster, self.region(cluster.region))

    def terminate(self, cluster: ClusterRef, nodes: list[Node]) -> None:
        if not nodes:
            return
        region = self.region(cluster.region)
        ids = [n.node_id for n in nodes]
        self._call(region, "terminate_instances", InstanceIds=ids)
        self._wait(region, ids, "instance_terminated")
        from mlcloud import keys

        keys.forget(ids)

    def cleanup(self, cluster: ClusterRef) -> None:
        region = self.region(cluster.region)
        sg = self._find_security_group(cluster, region, must=False)
        if sg:
            self._delete_with_retry(region, "delete_security_group", GroupId=sg)
        for kp in self._call(region, "describe_key_pairs", Filters=self._filter(cluster)).get(
            "KeyPairs", []
        ):
            self._call(region, "delete_key_pair", KeyName=kp["KeyName"])
        from mlcloud import keys

        keys.delete_cluster_key(cluster.uid)  # the private half goes with the public one
        for pg in self._call(
            region, "describe_placement_groups", Filters=self._filter(cluster)
        ).get("PlacementGroups", []):
            self._call(region, "delete_placement_group", GroupName=pg["GroupName"])

    def transport(
        self, cluster: ClusterRef, node: Node, label: str, ssh: SshOptions
    ) -> SshTransport:
        from mlcloud import keys

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

    # prices, for `mlcloud catalog refresh`

    def prices(
        self, items: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[float | None, float | None]]:
        """(instance type, region) -> (on-demand $/h from the Price List API, median of the
        latest spot price per zone from DescribeSpotPriceHistory); None where AWS has none."""
        import json
        import statistics
        from datetime import datetime, timezone

        from botocore.config import Config

        wanted = set(items)
        pricing = self.session.client(
            "pricing",
            region_name="us-east-1",  # the Price List API lives in us-east-1
            config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5),
        )
        on_demand: dict[tuple[str, str], float] = {}
        for itype in sorted({t for t, _ in wanted}):
            token = None
            while True:
                page = self._call_client(
                    pricing,
                    "get_products",
                    ServiceCode="AmazonEC2",
                    Filters=[
                        _term(k, v)
                        for k, v in (
                            ("instanceType", itype),
                            ("operatingSystem", "Linux"),
                            ("tenancy", "Shared"),
                            ("preInstalledSw", "NA"),
                            ("capacitystatus", "Used"),
                        )
                    ],
                    **({"NextToken": token} if token else {}),
                )
                for raw in page.get("PriceList", []):
                    item = json.loads(raw)
                    region = item["product"]["attributes"].get("regionCode", "")
                    for term in item.get("terms", {}).get("OnDemand", {}).values():
                        for dim in term.get("priceDimensions", {}).values():
                            usd = float(dim.get("pricePerUnit", {}).get("USD", 0) or 0)
                            if usd > 0 and (itype, region) in wanted:
                                on_demand[(itype, region)] = usd
                token = page.get("NextToken")
                if not token:
                    break
        spot: dict[tuple[str, str], float] = {}
        for region in sorted({r for _, r in wanted}):
            types = sorted({t for t, r in wanted if r == region})
            latest: dict[tuple[str, str], tuple[datetime, float]] = {}
            for h in self._paged(
                region,
                "describe_spot_price_history",
                "SpotPriceHistory",
                InstanceTypes=types,
                ProductDescriptions=["Linux/UNIX"],
                StartTime=datetime.now(timezone.utc),
            ):
                key = (h["InstanceType"], h["AvailabilityZone"])
                if key not in latest or h["Timestamp"] > latest[key][0]:
                    latest[key] = (h["Timestamp"], float(h["SpotPrice"]))
            for itype in types:
                samples = [p for (t, _), (_, p) in latest.items() if t == itype]
                if samples:
                    spot[(itype, region)] = statistics.median(samples)
        return {k: (on_demand.get(k), spot.get(k)) for k in wanted}

    def _call_client(self, client, op: str, **kwargs) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return getattr(client, op)(**kwargs)
        except NoCredentialsError:
            raise AuthError(f"no usable AWS credentials: {HOW_TO_CONFIGURE}") from None
        except ClientError as e:
            err = e.response.get("Error", {})
            raise ProviderError(f"AWS {op}: {err.get('Code')}: {err.get('Message')}") from None
        except BotoCoreError as e:
            raise ProviderError(f"AWS {op}: {e}") from None

    # garbage collection

    def discover(self, region: str | None) -> list[Resource]:
        """Everything in the region that carries mlcloud's tags, live instances first."""

        region = self.region(region)
        f = [{"Name": "tag-key", "Values": ["mlcloud-cluster"]}]
        found: list[Resource] = []
        for r in self._paged(
            region,
            "describe_instances",
            "Reservations",
            Filters=f + [{"Name": "instance-state-name", "Values": LIVE_STATES}],
        ):
            for i in r["Instances"]:
                found.append(_resource("instance", i["InstanceId"], i.get("Tags"), region))
        for g in self._call(region, "describe_security_groups", Filters=f)["SecurityGroups"]:
            found.append(_resource("security-group", g["GroupId"], g.get("Tags"), region))
        for k in self._call(region, "describe_key_pairs", Filters=f).get("KeyPairs", []):
            found.append(_resource("key-pair", k["KeyName"], k.get("Tags"), region))
        for p in self._call(region, "describe_placement_groups", Filters=f).get(
            "PlacementGroups", []
        ):
            found.append(_resource("placement-group", p["GroupName"], p.get("Tags"), region))
        return found

    def delete(self, resources: list[Resource]) -> None:
        """Delete what discover() found: instances first (and wait), then what they used."""
        by_region: dict[str, list[Resource]] = {}
        for r in resources:
            by_region.setdefault(r.region, []).append(r)
        for region, items in by_region.items():
            ids = [r.id for r in items if r.kind == "instance"]
            if ids:
                self._call(region, "terminate_instances", InstanceIds=ids)
                self._wait(region, ids, "instance_terminated")
            for r in items:
                if r.kind == "security-group":
                    self._delete_with_retry(region, "delete_security_group", GroupId=r.id)
                elif r.kind == "key-pair":
                    self._call(region, "delete_key_pair", KeyName=r.id)
                elif r.kind == "placement-group":
                    self._call(region, "delete_placement_group", GroupName=r.id)

    # helpers

    @staticmethod
    def _tags(cluster: ClusterRef, name: str) -> list[dict[str, str]]:
        tags = {**cluster.tags, "Name": name}
        return [{"Key": k, "Value": v} for k, v in tags.items()]

    @staticmethod
    def _filter(cluster: ClusterRef) -> list[dict]:
        return [{"Name": "tag:mlcloud-cluster", "Values": [cluster.uid]}]

    def _paged(self, region: str, op: str, key: str, **kwargs) -> list[dict]:
        out, token = [], None
        while True:
            page = self._call(region, op, **kwargs, **({"NextToken": token} if token else {}))
            out += page.get(key, [])
            token = page.get("NextToken")
            if not token:
                return out

    def _describe(self, cluster: ClusterRef, region: str) -> list[Node]:
        instances = [
            i
            for r in self._paged(
                region,
                "describe_instances",
                "Reservations",
                Filters=self._filter(cluster)
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
                f"~/.mlcloud/{cluster.uid}/{i['InstanceId']}",
                i["State"]["Name"],
            )
            for i in instances
        ]

    def _wait(self, region: str, ids: list[str], waiter: str) -> None:
        from botocore.exceptions import WaiterError

        try:
            self.client(region).get_waiter(waiter).wait(
                InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120}
            )
        except WaiterError as e:
            raise ProviderError(
                f"EC2 instances {', '.join(ids)} did not reach "
                f"{waiter.removeprefix('instance_')}: {e}"
            ) from None

    def _image(self, region: str, image: str | None) -> tuple[str, str]:
        """(image id, root device name): the one asked for, else the newest DLAMI."""
        if image:
            return image, self._root_device(region, image)
        newest = self.newest_dlami(region)
        return newest["ImageId"], newest.get("RootDeviceName") or "/dev/sda1"

    def newest_dlami(self, region: str) -> dict:
        images = self._call(
            region,
            "describe_images",
            Owners=["amazon"],
            Filters=[
                {"Name": "name", "Values": DLAMI_NAMES},
                {"Name": "state", "Values": ["available"]},
                {"Name": "architecture", "Values": ["x86_64"]},
            ],
        )["Images"]
        if not images:
            raise ProviderError(
                f"no AWS Deep Learning AMI with PyTorch found in {region}; "
                "set image: in the spec to an AMI id"
            )
        return max(images, key=lambda i: i.get("CreationDate", ""))

    def _root_device(self, region: str, image: str) -> str:
        images = self._call(region, "describe_images", ImageIds=[image])["Images"]
        if not images:
            raise UsageError(f"image {image} not found in {region}")
        return images[0].get("RootDeviceName") or "/dev/sda1"

    def _key_pair(self, cluster: ClusterRef, region: str, ssh: SshOptions) -> None:
        from mlcloud import keys

        name = f"mlcloud-{cluster.uid}"
        if self._call(region, "describe_key_pairs", Filters=self._filter(cluster)).get("KeyPairs"):
            return
        if ssh.identity_file:
            public = _public_key_of(ssh.identity_file)
        else:
            _, public = keys.ensure_cluster_key(cluster.uid)
        self._call(
            region,
            "import_key_pair",
            KeyName=name,
            PublicKeyMaterial=public.encode(),
            TagSpecifications=[{"ResourceType": "key-pair", "Tags": self._tags(cluster, name)}],
        )

    def _find_security_group(
        self, cluster: ClusterRef, region: str, must: bool = True
    ) -> str | None:
        groups = self._call(region, "describe_security_groups", Filters=self._filter(cluster))[
            "SecurityGroups"
        ]
        if not groups and must:
            raise ProviderError(f"security group of {cluster.name} not found in {region}")
        return groups[0]["GroupId"] if groups else None

    def _security_group(self, cluster: ClusterRef, region: str, ssh: SshOptions) -> None:
        found = self._find_security_group(cluster, region, must=False)
        if found:
            self._sg_ids[(region, cluster.uid)] = found
            return
        name = f"mlcloud-{cluster.uid}"
        vpcs = self._call(
            region, "describe_vpcs", Filters=[{"Name": "isDefault", "Values": ["true"]}]
        )["Vpcs"]
        if not vpcs:
            raise ProviderError(
                f"no default VPC in {region}; create one "
                "(`aws ec2 create-default-vpc`) or pick another region"
            )
        sg = self._call(
            region,
            "create_security_group",
            GroupName=name,
            Description=f"mlcloud cluster {cluster.name}: SSH from the caller, "
            "all traffic within the cluster",
            VpcId=vpcs[0]["VpcId"],
            TagSpecifications=[
                {"ResourceType": "security-group", "Tags": self._tags(cluster, name)}
            ],
        )["GroupId"]
        self._sg_ids[(region, cluster.uid)] = sg
        cidrs = list(ssh.allowed_cidrs) if ssh.allowed_cidrs else [self.caller_cidr(region)]
        self._call(
            region,
            "authorize_security_group_ingress",
            GroupId=sg,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": 22,
                    "ToPort": 22,
                    "IpRanges": [
                        {"CidrIp": c, "Description": "mlcloud: SSH from the caller"} for c in cidrs
                    ],
                },
                {
                    "IpProtocol": "-1",
                    "UserIdGroupPairs": [
                        {
                            "GroupId": sg,
                            "Description": "mlcloud: within the cluster (NCCL, rendezvous)",
                        }
                    ],
                },
            ],
        )

    def _placement_group(self, cluster: ClusterRef, region: str) -> None:
        if self._call(region, "describe_placement_groups", Filters=self._filter(cluster)).get(
            "PlacementGroups"
        ):
            return
        name = f"mlcloud-{cluster.uid}"
        self._call(
            region,
            "create_placement_group",
            GroupName=name,
            Strategy="cluster",
            TagSpecifications=[
                {"ResourceType": "placement-group", "Tags": self._tags(cluster, name)}
            ],
        )

    def _delete_with_retry(self, region: str, op: str, **kwargs) -> None:
        """A group still referenced by terminating instances answers DependencyViolation."""
        deadline = time.monotonic() + 120
        while True:
            try:
                self._call(region, op, **kwargs)
                return
            except ProviderError as e:
                if "DependencyViolation" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(5)

    def caller_cidr(self, region: str) -> str:
        """The address EC2 sees us from, as a /32, without leaving this machine if possible.

        The source address of our route to the endpoint is it when that address is public, or
        when the endpoint is on this machine (an emulator); behind NAT only a lookup can tell,
        and that failing is a one-line error asking for ssh.allowed_cidrs."""
        endpoint = urlparse(self.client(region).meta.endpoint_url).hostname or ""
        try:
            port = 443
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                target = ipaddress.ip_address(socket.gethostbyname(endpoint))
                s.connect((str(target), port))  # UDP: sends nothing
                source = ipaddress.ip_address(s.getsockname()[0])
        except OSError:
            source = target = None
        if source is not None and (source.is_global or target.is_loopback):
            return f"{source}/32"
        address = _public_address_lookup()
        if address is None:
            raise UsageError(
                "cannot tell this machine's public address to open SSH to it; "
                "set ssh.allowed_cidrs (or --allow-ssh-from CIDR)"
            )
        return f"{address}/32"


def _public_address_lookup() -> str | None:
    """checkip.amazonaws.com, once, with a short timeout; None when offline."""
    if os.environ.get("MLCLOUD_OFFLINE"):
        return None
    import urllib.request

    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=3) as r:  # noqa: S310
            text = r.read().decode().strip()
        return str(ipaddress.ip_address(text))
    except (OSError, ValueError):
        return None


def _term(field: str, value: str) -> dict:
    return {"Type": "TERM_MATCH", "Field": field, "Value": value}


def _public_key_of(identity_file: str) -> str:
    from mlcloud.remote.ssh import load_identity

    key = load_identity(identity_file)
    return f"{key.get_name()} {key.get_base64()}"


def _resource(kind: str, rid: str, tags: list | None, region: str) -> Resource:
    from mlcloud.providers.base import Resource

    t = {x["Key"]: x["Value"] for x in tags or []}
    return Resource(
        "aws",
        kind,
        rid,
        t.get("mlcloud-cluster", ""),
        t.get("mlcloud-name", ""),
        t.get("mlcloud-owner", ""),
        region,
    )
