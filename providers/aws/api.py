"""EC2 and the other AWS APIs as the provider uses them: one boto3 session, clients with
bounded retries and timeouts, and every SDK failure turned into one of mlcloud's typed errors,
in one line. Also what botocore's bundled data says AWS accepts (regions, instance types).
boto3 is imported only here, and only when a call is made."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlcloud.providers.base import (
    AuthError,
    CapacityError,
    ClusterRef,
    ProviderError,
    QuotaError,
    Resource,
)

from mlcloud.errors import UsageError

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


class Api:
    """One boto3 session and its clients (EC2 per region; IAM and STS), made on first use."""

    def __init__(self) -> None:
        self._session: Any = None
        self._clients: dict[str, Any] = {}
        self._iam: Any = None
        self._identity: str | None = None  # the caller's ARN, asked once

    @property
    def session(self):
        if self._session is None:
            from mlcloud import botosession

            with sdk_errors("session", None):
                self._session = botosession.session()
        return self._session

    def region(self, request_region: str | None = None) -> str:
        with sdk_errors("configuration", None):
            region = request_region or self.session.region_name
        if not region:
            raise UsageError(
                f"no AWS region: pass --region, set region: in the spec, or {HOW_TO_CONFIGURE}"
            )
        return region

    @staticmethod
    def config():
        from botocore.config import Config

        return Config(
            retries=dict(RETRIES), connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S
        )

    def client(self, region: str):
        if region not in self._clients:
            with sdk_errors("client", region):
                self._clients[region] = self.session.client(
                    "ec2", region_name=region, config=self.config()
                )
        return self._clients[region]

    def call(self, region: str, op: str, zone: str | None = None, **kwargs) -> dict:
        """One EC2 call; botocore's standard mode retries throttling with jittered backoff.
        Every failure leaves as one of the typed errors, in one line."""
        from botocore.exceptions import ClientError

        where = zone or region
        with sdk_errors(api_name(op), where):
            try:
                return getattr(self.client(region), op)(**kwargs)
            except NotImplementedError as e:  # moto in-process, for what it lacks
                raise Unsupported(f"aws: EC2 {api_name(op)} is not implemented here") from e
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

    @staticmethod
    def call_client(client, op: str, **kwargs) -> dict:
        """One call on any AWS client, its failures typed as `call`'s."""
        with sdk_errors(f"{client.meta.service_model.service_name} {api_name(op)}", None):
            return getattr(client, op)(**kwargs)

    def iam(self, op: str, **kwargs) -> dict:
        """One IAM call (IAM is global: one client)."""
        if self._iam is None:
            with sdk_errors("client", None):
                self._iam = self.session.client("iam", config=self.config())
        return self.call_client(self._iam, op, **kwargs)

    def paged(self, region: str, op: str, key: str, **kwargs) -> list[dict]:
        out, token = [], None
        while True:
            page = self.call(region, op, **kwargs, **({"NextToken": token} if token else {}))
            out += page.get(key, [])
            token = page.get("NextToken")
            if not token:
                return out

    def wait(self, region: str, ids: list[str], waiter: str) -> None:
        from botocore.exceptions import WaiterError

        with sdk_errors(f"EC2 wait for {waiter.removeprefix('instance_')}", region):
            try:
                self.client(region).get_waiter(waiter).wait(
                    InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120}
                )
            except WaiterError as e:
                raise ProviderError(
                    f"EC2 instances {', '.join(ids)} did not reach "
                    f"{waiter.removeprefix('instance_')}: {short(str(e))}"
                ) from e

    def identity(self, region: str) -> str:
        """The caller's ARN (STS GetCallerIdentity, once; "" where STS cannot tell): clusters
        are tagged with it, so `gc` can say whose an orphan was."""
        if self._identity is None:
            try:
                with sdk_errors("client", region):
                    sts = self.session.client("sts", region_name=region, config=self.config())
                self._identity = self.call_client(sts, "get_caller_identity").get("Arn", "")
            except ProviderError:  # an endpoint without STS: the owner tag still tells homes apart
                self._identity = ""
        return self._identity

    def tags(self, cluster: ClusterRef, name: str) -> list[dict[str, str]]:
        """The tags of every resource made for the cluster, with the caller's ARN once known."""
        tags = {**cluster.tags, "Name": name}
        if self._identity:
            tags["mlcloud-identity"] = self._identity
        return [{"Key": k, "Value": v} for k, v in tags.items()]


ANY_CLUSTER = [{"Name": "tag-key", "Values": ["mlcloud-cluster"]}]  # EC2's filter: every cluster's


def by_cluster(cluster: ClusterRef) -> list[dict]:
    """EC2's filter for the cluster's resources."""
    return [{"Name": "tag:mlcloud-cluster", "Values": [cluster.uid]}]


REGION_TAG = "mlcloud-region"  # IAM is global: the region of the cluster a role serves


def tagged(kind: str, rid: str, tags: list | None, region: str, created: Any = None) -> Resource:
    """An AWS resource (EC2 or IAM) as `gc` sees it, from its mlcloud tags; a global IAM
    resource names its region in a tag of its own."""
    t = {x["Key"]: x["Value"] for x in tags or []}
    return Resource(
        "aws",
        kind,
        rid,
        t.get("mlcloud-cluster", ""),
        t.get("mlcloud-name", ""),
        t.get("mlcloud-owner", ""),
        t.get(REGION_TAG, region),
        t.get("mlcloud-identity", ""),
        created.timestamp() if created is not None else None,
    )


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
def sdk_errors(operation: str, where: str | None) -> Iterator[None]:
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
        message = short(f"{code}: {e.response.get('Error', {}).get('Message', '')}")
        if code in AUTH_CODES:
            raise AuthError(f"AWS refused the credentials ({message}); {HOW_TO_CONFIGURE}") from e
        kind = Unsupported if code in UNSUPPORTED_CODES else ProviderError
        raise kind(f"aws: {operation}{place} failed: {message}; {debug}") from e
    except BotoCoreError as e:
        raise ProviderError(f"aws: {operation}{place} failed: {short(str(e))}; {debug}") from e


def short(text: str, limit: int = 160) -> str:
    """The first line of an SDK message, cut to a readable length."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else "no message"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def api_name(op: str) -> str:
    """describe_instances -> DescribeInstances, as AWS names the operation."""
    return "".join(w.capitalize() for w in op.split("_"))
