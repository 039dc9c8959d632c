"""AWS EC2: GPU instances on demand or spot, secure by default, found again by tag.

One RunInstances call per attempt (MinCount = MaxCount: all or nothing), with a ClientToken
derived from the cluster and the attempt. Every resource carries the cluster's tags. Errors
become the typed ones the engine's failover reads. boto3 is imported only here.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlparse

from mlcloud.providers import aws_iam
from mlcloud.providers.base import (
    AuthError,
    Capabilities,
    CapacityError,
    ClusterRef,
    Node,
    Prepared,
    ProviderError,
    ProvisionRequest,
    QuotaError,
    SshOptions,
)

from mlcloud.errors import UsageError
from mlcloud.remote.ssh import SshTarget, SshTransport

if TYPE_CHECKING:
    from mlcloud.providers.base import Resource

DEFAULT_USER = "ubuntu"  # the Ubuntu DLAMI's, and so of clusters recorded before it was pinned
DISK_GB = 200
# The Ubuntu builds only: the Amazon Linux 2023 ones share the prefix and log in as ec2-user.
# Newest first by CreationDate; the OSS-driver PyTorch DLAMI is the one AWS maintains today.
DLAMI_NAMES = [
    "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu *",
    "Deep Learning AMI GPU PyTorch * (Ubuntu *",
]
_DLAMI_UBUNTU = re.compile(r"\(Ubuntu \d+\.\d+\)")
# The login user of an image family, told by its name or description: first match wins.
LOGIN_USERS = [
    (re.compile(r"ubuntu", re.I), "ubuntu"),
    (re.compile(r"amazon linux|amzn|\bal2(023)?\b", re.I), "ec2-user"),
    (re.compile(r"debian", re.I), "admin"),
    (re.compile(r"\brhel\b|red hat|suse|\bsles\b|almalinux", re.I), "ec2-user"),
    (re.compile(r"centos", re.I), "centos"),
    (re.compile(r"rocky", re.I), "rocky"),
    (re.compile(r"fedora", re.I), "fedora"),
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
# What an endpoint without an operation answers (EC2 itself, or an emulator such as moto).
UNSUPPORTED_CODES = {"InvalidAction", "UnsupportedOperation", "NotImplemented"}
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
HOW_TO_CONFIGURE = (
    "configure AWS credentials (`aws configure`, AWS_PROFILE, or "
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and a region (AWS_REGION)"
)
# A few seconds against an endpoint that only fails, yet throttling (RequestLimitExceeded)
# still gets three retries with jittered backoff; a ClientToken makes a retried launch safe.
RETRIES = {"mode": "standard", "max_attempts": 4}
# signs of credentials besides the files (an instance or container role shows none of these)
CREDENTIAL_ENVS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30


class Unsupported(ProviderError):
    """The endpoint does not implement the operation (or answers it with something not EC2's)."""


class AwsProvider:
    name: ClassVar[str] = "aws"
    boot_timeout: ClassVar[float] = 600.0
    # stop/start is EC2's but not this provider's: its nodes terminate when they shut down
    capabilities: ClassVar[Capabilities] = Capabilities(
        spot=True, placement=True, owns_machines=True
    )

    def __init__(self) -> None:
        self._session: Any = None
        self._clients: dict[str, Any] = {}
        self._sg_ids: dict[tuple[str, str], str] = {}  # (region, cluster uid) -> group id
        self._pgs: dict[tuple[str, str], str] = {}  # (region, cluster uid) -> placement group
        self._identity: str | None = None  # the caller's ARN, asked once
        self._roots: dict[tuple[str, str], str] = {}  # (region, image) -> root device name
        self._pg_warned = False
        self._iam_client: Any = None
        self._storage_warned = False

    @property
    def iam(self):
        """The cluster roles for bucket access (providers/aws_iam.py); IAM is global."""
        from mlcloud.providers.aws_iam import Iam

        if self._iam_client is None:
            with _sdk_errors("client", None):
                self._iam_client = self.session.client("iam", config=self._config())
        return Iam(functools.partial(self._call_client, self._iam_client), Unsupported)

    # boto3, lazily

    @property
    def session(self):
        if self._session is None:
            import boto3

            with _sdk_errors("session", None):
                self._session = boto3.session.Session()
        return self._session

    def default_region(self) -> str | None:
        return self.region()

    def configured(self) -> bool:
        home = Path(os.environ.get("HOME", "~")).expanduser()
        files = (
            os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials",
            os.environ.get("AWS_CONFIG_FILE") or home / ".aws" / "config",
        )
        return any(os.environ.get(v) for v in CREDENTIAL_ENVS) or any(
            Path(f).is_file() for f in files
        )

    def region(self, request_region: str | None = None) -> str:
        with _sdk_errors("configuration", None):
            region = request_region or self.session.region_name
        if not region:
            raise UsageError(
                f"no AWS region: pass --region, set region: in the spec, or {HOW_TO_CONFIGURE}"
            )
        return region

    @staticmethod
    def _config():
        from botocore.config import Config

        return Config(
            retries=dict(RETRIES), connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S
        )

    def client(self, region: str):
        if region not in self._clients:
            with _sdk_errors("client", region):
                self._clients[region] = self.session.client(
                    "ec2", region_name=region, config=self._config()
                )
        return self._clients[region]

    def _call(self, region: str, op: str, zone: str | None = None, **kwargs) -> dict:
        """One EC2 call; botocore's standard mode retries throttling with jittered backoff.
        Every failure leaves as one of the typed errors, in one line."""
        from botocore.exceptions import ClientError

        where = zone or region
        with _sdk_errors(_api_name(op), where):
            try:
                return getattr(self.client(region), op)(**kwargs)
            except NotImplementedError as e:  # moto in-process, for what it lacks
                raise Unsupported(f"aws: EC2 {_api_name(op)} is not implemented here") from e
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                message = e.response.get("Error", {}).get("Message", "")
                if code in CAPACITY_CODES:
                    raise CapacityError(where, f"EC2 {where}: {code}: {message}") from e
                if code in QUOTA_CODES:  # quotas are regional
                    raise QuotaError(
                        region,
                        f"EC2 quota in {region}: {code}: {message}; ask AWS "
                        "for a higher limit or pick another region",
                    ) from e
                raise

    # the contract

    def check(self, request: ProvisionRequest) -> None:
        with _sdk_errors("credentials", None):
            credentials = self.session.get_credentials()  # local: env, files, SSO cache
        if credentials is None:
            raise AuthError(f"no usable AWS credentials: {HOW_TO_CONFIGURE}")
        check_region(self.region(request.region))
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

    def prepare(self, cluster: ClusterRef, request: ProvisionRequest) -> Prepared:
        """Key pair, security group (repaired if a crash left it without its rules) and, for
        several nodes, a placement group; the image and its login user pinned."""
        region = self.region(request.region)
        request = self._pin_image(region, request)
        self.identity(region)
        self._key_pair(cluster, region, request.ssh)
        self._security_group(cluster, region, request.ssh)
        warnings = () if self._storage_warned else _storage_warnings(request)
        self._storage_warned |= bool(warnings)  # once, not again for each zone tried
        if aws_iam.policy(request.storage, region):
            name = aws_iam.name_of(cluster.uid)
            self.iam.ensure(cluster, request.storage, region, self._tags(cluster, name))
        if request.count > 1:
            warning = self._placement_group(cluster, region)
            if warning and not self._pg_warned:
                self._pg_warned = True
                warnings += (warning,)
        return Prepared(request, warnings)

    def create(self, cluster: ClusterRef, request: ProvisionRequest, count: int) -> list[Node]:
        region = self.region(request.region)
        image, root_device = self._image(region, request.image)
        sg = self._sg_ids.get((region, cluster.uid)) or self._find_security_group(cluster, region)
        tags = self._tags(cluster, f"mlcloud-{cluster.name}")
        # The engine asks for what is missing, so (place, count, already there) names the try;
        # a resumed `up` retries the recorded place with the same token, so EC2 launches once.
        place = request.zone or region
        attempt = f"{place}:{count}:{request.count - count}:{request.instance_type}:{request.spot}"
        token = f"{cluster.uid}-{hashlib.sha256(attempt.encode()).hexdigest()[:16]}"
        placement: dict[str, str] = {}
        if request.zone:
            placement["AvailabilityZone"] = request.zone
        group = self._pgs.get((region, cluster.uid)) if request.count > 1 else None
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
                {"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")
            ],
        )
        if placement:
            params["Placement"] = placement
        if aws_iam.policy(request.storage, region):
            params["IamInstanceProfile"] = {"Name": aws_iam.name_of(cluster.uid)}
        if request.spot:
            spot: dict[str, Any] = {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            }
            if request.max_price:
                spot["MaxPrice"] = f"{request.max_price:.4f}"
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        out = aws_iam.launch_retrying(
            lambda: self._call(region, "run_instances", zone=request.zone, **params)
        )
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
        from mlcloud.remote import keys

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
        for pg in self._placement_groups(region, self._filter(cluster)):
            self._call(region, "delete_placement_group", GroupName=pg["GroupName"])
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

    # prices, for `mlcloud catalog refresh`

    def prices(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """(instance type, region) -> on-demand $/h from the Price List API, where it has one."""
        import json

        from botocore.config import Config

        wanted = set(pairs)
        with _sdk_errors("client", "us-east-1"):
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
        return on_demand

    def spot_prices(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """(instance type, region) -> the median of the latest spot price per zone, from
        DescribeSpotPriceHistory, where AWS has one."""
        import statistics
        from datetime import datetime, timezone

        wanted = set(pairs)
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
        return spot

    @staticmethod
    def _call_client(client, op: str, **kwargs) -> dict:
        with _sdk_errors(f"{client.meta.service_model.service_name} {_api_name(op)}", None):
            return getattr(client, op)(**kwargs)

    def identity(self, region: str) -> str:
        """The caller's ARN (STS GetCallerIdentity, once; "" where STS cannot tell): clusters
        are tagged with it, so `gc` can say whose an orphan was."""
        if self._identity is None:
            try:
                with _sdk_errors("client", region):
                    sts = self.session.client("sts", region_name=region, config=self._config())
                self._identity = self._call_client(sts, "get_caller_identity").get("Arn", "")
            except ProviderError:  # an endpoint without STS: the owner tag still tells homes apart
                self._identity = ""
        return self._identity

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
                found.append(
                    aws_iam.tagged(
                        "instance", i["InstanceId"], i.get("Tags"), region, i.get("LaunchTime")
                    )
                )
        for g in self._call(region, "describe_security_groups", Filters=f)["SecurityGroups"]:
            found.append(aws_iam.tagged("security-group", g["GroupId"], g.get("Tags"), region))
        for k in self._call(region, "describe_key_pairs", Filters=f).get("KeyPairs", []):
            found.append(
                aws_iam.tagged("key-pair", k["KeyName"], k.get("Tags"), region, k.get("CreateTime"))
            )
        for p in self._placement_groups(region, f):
            found.append(aws_iam.tagged("placement-group", p["GroupName"], p.get("Tags"), region))
        return found + self.iam.discover(region)

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
            self.iam.delete_found(items)

    # helpers

    def _tags(self, cluster: ClusterRef, name: str) -> list[dict[str, str]]:
        tags = {**cluster.tags, "Name": name}
        if self._identity:
            tags["mlcloud-identity"] = self._identity
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

        with _sdk_errors(f"EC2 wait for {waiter.removeprefix('instance_')}", region):
            try:
                self.client(region).get_waiter(waiter).wait(
                    InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120}
                )
            except WaiterError as e:
                raise ProviderError(
                    f"EC2 instances {', '.join(ids)} did not reach "
                    f"{waiter.removeprefix('instance_')}: {_short(str(e))}"
                ) from e

    def _image(self, region: str, image: str | None) -> tuple[str, str]:
        """(image id, root device name): the one asked for (or pinned), else the newest DLAMI."""
        if not image:
            image = self._pin_image(region, ProvisionRequest(count=1)).image
        assert image is not None
        if (region, image) not in self._roots:
            self._describe_image(region, image)
        return image, self._roots[(region, image)]

    def _pin_image(self, region: str, request: ProvisionRequest) -> ProvisionRequest:
        """The request with its image and login user decided: the newest Ubuntu DLAMI (user
        ubuntu), or the asked image with ssh.user, else the user its name implies."""
        if not request.image:
            newest = self.newest_dlami(region)
            self._roots[(region, newest["ImageId"])] = newest.get("RootDeviceName") or "/dev/sda1"
            user = request.ssh.user or DEFAULT_USER
            return replace(request, image=newest["ImageId"], ssh=replace(request.ssh, user=user))
        if request.ssh.user:
            return request
        found = self._describe_image(region, request.image)
        user = login_user(found.get("Name", ""), found.get("Description", ""))
        if user is None:
            raise UsageError(
                f"image {request.image} ({found.get('Name') or 'no name'}): cannot tell its login "
                "user; set ssh.user in the spec or pass --ssh-user"
            )
        return replace(request, ssh=replace(request.ssh, user=user))

    def _describe_image(self, region: str, image: str) -> dict:
        try:
            images = self._call(region, "describe_images", ImageIds=[image])["Images"]
        except ProviderError as e:
            if "InvalidAMIID" not in str(e):
                raise
            images = []
        if not images:
            raise UsageError(f"image {image} not found in {region}; check image: (or --image)")
        self._roots[(region, image)] = images[0].get("RootDeviceName") or "/dev/sda1"
        return images[0]

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
        images = [i for i in images if _DLAMI_UBUNTU.search(i.get("Name", ""))]
        if not images:
            raise ProviderError(
                f"no AWS Deep Learning AMI with PyTorch on Ubuntu found in {region}; "
                "set image: in the spec to an AMI id"
            )
        return max(images, key=lambda i: i.get("CreationDate", ""))

    def _key_pair(self, cluster: ClusterRef, region: str, ssh: SshOptions) -> None:
        from mlcloud.remote import keys

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
        """The cluster's group with SSH from the allowed addresses and everything within the
        group. Creating a group and adding its rules are two calls, so a group found again
        (a resumed `up`) gets whatever rule it lacks: one a crash left out, or the caller's
        new address. Rules are only ever added, never removed: some may be the user's own."""
        groups = self._call(region, "describe_security_groups", Filters=self._filter(cluster))[
            "SecurityGroups"
        ]
        if groups:
            sg, permissions = groups[0]["GroupId"], groups[0].get("IpPermissions", [])
        else:
            sg, permissions = self._create_security_group(cluster, region), []
        self._sg_ids[(region, cluster.uid)] = sg
        cidrs = list(ssh.allowed_cidrs) if ssh.allowed_cidrs else [self.caller_cidr(region)]
        missing = missing_rules(sg, permissions, cidrs)
        if not missing:
            return
        try:
            self._call(
                region, "authorize_security_group_ingress", GroupId=sg, IpPermissions=missing
            )
        except ProviderError as e:
            if "InvalidPermission.Duplicate" not in str(e):  # another `up` added it first
                raise

    def _create_security_group(self, cluster: ClusterRef, region: str) -> str:
        name = f"mlcloud-{cluster.uid}"
        vpcs = self._call(
            region, "describe_vpcs", Filters=[{"Name": "isDefault", "Values": ["true"]}]
        )["Vpcs"]
        if not vpcs:
            raise ProviderError(
                f"no default VPC in {region}; create one "
                "(`aws ec2 create-default-vpc`) or pick another region"
            )
        return self._call(
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

    def _placement_group(self, cluster: ClusterRef, region: str) -> str | None:
        """Make the cluster's placement group (nodes close together, for NCCL); where the
        endpoint has none or refuses to make one, the nodes go without: the warning says so."""
        name = f"mlcloud-{cluster.uid}"
        try:
            if not self._placement_groups(region, self._filter(cluster), strict=True):
                self._call(
                    region,
                    "create_placement_group",
                    GroupName=name,
                    Strategy="cluster",
                    TagSpecifications=[
                        {"ResourceType": "placement-group", "Tags": self._tags(cluster, name)}
                    ],
                )
        except Unsupported:
            return (
                f"no cluster placement group in {region}: the endpoint does not implement "
                "them; the nodes go without one"
            )
        except ProviderError as e:  # not allowed to, or a limit: still worth the nodes
            return f"no cluster placement group in {region} ({e}); the nodes go without one"
        self._pgs[(region, cluster.uid)] = name
        return None

    def _placement_groups(self, region: str, filters: list[dict], strict: bool = False) -> list:
        """Tagged placement groups; none where the endpoint lacks them (unless strict)."""
        try:
            return self._call(region, "describe_placement_groups", Filters=filters).get(
                "PlacementGroups", []
            )
        except Unsupported:
            if strict:
                raise
            return []

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


def _storage_warnings(request: ProvisionRequest) -> tuple[str, ...]:
    return tuple(
        f"storage {uri}: an AWS cluster's nodes get credentials for S3 only, none for this "
        "bucket; grant them access yourself or use an s3:// bucket"
        for uri in aws_iam.other_cloud(request.storage)
    )


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


def missing_rules(group_id: str, permissions: list[dict], cidrs: list[str]) -> list[dict]:
    """The ingress rules to add so SSH is open to `cidrs` and all traffic within the group,
    given the group's present rules (a CIDR inside a wider rule already is covered)."""

    def covers(p: dict, port: int | None) -> bool:
        if p.get("IpProtocol") == "-1":
            return True
        return (
            port is not None
            and p.get("IpProtocol") == "tcp"
            and p.get("FromPort", -1) <= port <= p.get("ToPort", -1)
        )

    present = [
        ipaddress.ip_network(r[key], strict=False)
        for p in permissions
        if covers(p, 22)
        for ranges, key in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6"))
        for r in p.get(ranges, [])
    ]
    need = []
    for c in cidrs:
        net = ipaddress.ip_network(c, strict=False)
        if not any(net.version == have.version and net.subnet_of(have) for have in present):
            need.append(net)
    rules = []
    v4 = [str(n) for n in need if n.version == 4]
    v6 = [str(n) for n in need if n.version == 6]
    if v4 or v6:
        what = "mlcloud: SSH from the caller"
        rules.append(
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                **({"IpRanges": [{"CidrIp": c, "Description": what} for c in v4]} if v4 else {}),
                **(
                    {"Ipv6Ranges": [{"CidrIpv6": c, "Description": what} for c in v6]} if v6 else {}
                ),
            }
        )
    within = any(
        p.get("IpProtocol") == "-1"
        and any(g.get("GroupId") == group_id for g in p.get("UserIdGroupPairs", []))
        for p in permissions
    )
    if not within:
        rules.append(
            {
                "IpProtocol": "-1",
                "UserIdGroupPairs": [
                    {
                        "GroupId": group_id,
                        "Description": "mlcloud: within the cluster (NCCL, rendezvous)",
                    }
                ],
            }
        )
    return rules


def login_user(name: str, description: str = "") -> str | None:
    """The user an image logs in as, told by its name (then description); None if unknown."""
    for text in (name, description):
        for pattern, user in LOGIN_USERS:
            if pattern.search(text or ""):
                return user
    return None


def check_region(region: str) -> None:
    """A region botocore or the catalog knows, else one line with the closest names."""
    known = _known_regions()
    if region not in known:
        raise UsageError(
            f"--region {region}: not an AWS region{_close(region, known)} "
            "(if it is new, upgrade boto3)"
        )


def check_instance_type(instance_type: str) -> None:
    """An EC2 instance type botocore or the catalog knows, else one line with close names."""
    known = _known_instance_types()
    if instance_type not in known:
        raise UsageError(
            f"--instance-type {instance_type}: not an EC2 instance type"
            f"{_close(instance_type, known)} (`mlcloud offers` lists GPU types; "
            "if it is new, upgrade boto3)"
        )


def _close(word: str, known: set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _catalog_aws() -> list:
    from mlcloud.spec import catalog

    return [o for o in catalog.load() if o.provider == "aws"]


@functools.cache
def _known_regions() -> set[str]:
    """Every partition's EC2 regions from botocore's bundled endpoint data (no network)."""
    import botocore.session

    s = botocore.session.get_session()
    regions = {
        r
        for partition in s.get_available_partitions()
        for r in s.get_available_regions("ec2", partition_name=partition)
    }
    return regions | {o.region for o in _catalog_aws()}


@functools.cache
def _known_instance_types() -> set[str]:
    """The InstanceType enum of botocore's bundled EC2 model (no network; read once, as
    reading the model is most of the cost of making an EC2 client)."""
    import botocore.session

    shape = botocore.session.get_session().get_service_model("ec2").shape_for("InstanceType")
    return set(shape.enum) | {o.instance_type for o in _catalog_aws()}


@contextmanager
def _sdk_errors(operation: str, where: str | None) -> Iterator[None]:
    """botocore's errors as mlcloud's typed ones, each one line; an unclassified one reads
    "aws: OPERATION in WHERE failed: short message; --debug for details" (the traceback)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )
    from botocore.parsers import ResponseParserError

    place = f" in {where}" if where else ""
    debug = "--debug for details"
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise AuthError(f"no usable AWS credentials: {HOW_TO_CONFIGURE}") from e
    except ProfileNotFound as e:
        raise AuthError(f"{e}: {HOW_TO_CONFIGURE}") from e
    except EndpointConnectionError as e:
        raise ProviderError(
            f"aws: {operation}{place}: cannot reach {e.kwargs.get('endpoint_url', 'AWS')}; "
            f"check the network (or AWS_ENDPOINT_URL); {debug}"
        ) from e
    except ResponseParserError as e:
        raise Unsupported(
            f"aws: {operation}{place} failed: the endpoint's answer is not an AWS response "
            f"(an error page?); {debug}"
        ) from e
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        message = _short(f"{code}: {e.response.get('Error', {}).get('Message', '')}")
        if code in AUTH_CODES:
            raise AuthError(f"AWS refused the credentials ({message}); {HOW_TO_CONFIGURE}") from e
        kind = Unsupported if code in UNSUPPORTED_CODES else ProviderError
        raise kind(f"aws: {operation}{place} failed: {message}; {debug}") from e
    except BotoCoreError as e:
        raise ProviderError(f"aws: {operation}{place} failed: {_short(str(e))}; {debug}") from e


def _short(text: str, limit: int = 160) -> str:
    """The first line of an SDK message, cut to a readable length."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else "no message"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _api_name(op: str) -> str:
    """describe_instances -> DescribeInstances, as AWS names the operation."""
    return "".join(w.capitalize() for w in op.split("_"))


def _term(field: str, value: str) -> dict:
    return {"Type": "TERM_MATCH", "Field": field, "Value": value}


def _public_key_of(identity_file: str) -> str:
    from mlcloud.remote.ssh import load_identity

    key = load_identity(identity_file)
    return f"{key.get_name()} {key.get_base64()}"
