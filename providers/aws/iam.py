"""Least-privilege bucket credentials for a cluster's nodes: one IAM role and instance profile
per cluster whose inline policy allows exactly the spec's S3 prefixes (read for `data`,
read/write for `checkpoints`). No `storage:`, no role.

The nodes get temporary credentials from the instance metadata service; the user's own keys
never leave this machine. Role and profile carry the cluster's tags and live under the IAM
path /mlcloud/, so `gc` finds them; IAM is global, so a tag names the cluster's region, where
they are reported."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from mlcloud.providers.aws.api import REGION_TAG, Api, Unsupported, tagged
from mlcloud.providers.base import ClusterRef, ProviderError, Resource, StorageAccess

from mlcloud.spec import buckets

PATH = "/mlcloud/"
POLICY_NAME = "mlcloud-storage"
ROLE, PROFILE = "iam-role", "instance-profile"
READ_ACTIONS = ["s3:GetObject"]
WRITE_ACTIONS = [
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
]
TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}
# EC2 learns of a new instance profile seconds after IAM made it: until then RunInstances
# refuses it as an invalid name. Retried for this long, then the error stands.
FRESH_PROFILE_WAIT_S = 90.0


def name_of(uid: str) -> str:
    """The role's and the instance profile's name (at most 57 characters: IAM allows 64)."""
    return f"mlcloud-{uid}"


def s3_uris(uris: tuple[str, ...]) -> list[buckets.BucketUri]:
    return [u for u in map(buckets.parse, uris) if u.scheme == "s3"]


def other_cloud(storage: StorageAccess) -> list[str]:
    """The URIs an AWS instance profile cannot cover (gs://): the nodes get nothing for them."""
    return [u for u in (*storage.write, *storage.read) if buckets.parse(u).scheme != "s3"]


def policy(storage: StorageAccess, region: str) -> dict | None:
    """The role's inline policy: objects under each prefix (read, or read/write/delete for
    checkpoints), and listing the bucket only under that prefix. None without S3 URIs."""
    partition = _partition(region)
    statements: list[dict[str, Any]] = []
    for kind, uris, actions in (
        ("Checkpoints", storage.write, WRITE_ACTIONS),
        ("Data", storage.read, READ_ACTIONS),
    ):
        for i, uri in enumerate(s3_uris(uris)):
            objects = f"{uri.prefix}/*" if uri.prefix else "*"
            listing: dict[str, Any] = {
                "Sid": f"{kind}List{i}",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"arn:{partition}:s3:::{uri.bucket}",
            }
            if uri.prefix:
                listing["Condition"] = {"StringLike": {"s3:prefix": [objects]}}
            statements += [
                listing,
                {
                    "Sid": f"{kind}Objects{i}",
                    "Effect": "Allow",
                    "Action": list(actions),
                    "Resource": f"arn:{partition}:s3:::{uri.bucket}/{objects}",
                },
            ]
    return {"Version": "2012-10-17", "Statement": statements} if statements else None


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


class Iam:
    """The cluster roles' IAM calls (IAM is global: no region)."""

    def __init__(self, api: Api):
        self.call = api.iam

    def _absent(self, e: ProviderError) -> bool:
        """Credentials that may not read IAM, or an endpoint without it, made no role."""
        return _code(e) == "AccessDenied" or isinstance(e, Unsupported)

    def ensure(
        self, cluster: ClusterRef, storage: StorageAccess, region: str, tags: list[dict]
    ) -> str | None:
        """Make (or bring in line) the cluster's role and instance profile; their name, or
        None when the spec names no S3 prefix. Idempotent: a resumed `up` finds them."""
        document = policy(storage, region)
        if document is None:
            return None
        name = name_of(cluster.uid)
        tags = [t for t in tags if t["Key"] != REGION_TAG] + [{"Key": REGION_TAG, "Value": region}]
        if self._get("get_role", RoleName=name) is None:
            self.call(
                "create_role",
                RoleName=name,
                Path=PATH,
                AssumeRolePolicyDocument=json.dumps(TRUST),
                Description=f"mlcloud cluster {cluster.name}: its nodes' bucket access",
                Tags=tags,
            )
        else:  # failover to another region moves the cluster
            self.call("tag_role", RoleName=name, Tags=tags)
        # put again on every `up`: the policy follows the spec the cluster was made with
        self.call(
            "put_role_policy",
            RoleName=name,
            PolicyName=POLICY_NAME,
            PolicyDocument=json.dumps(document),
        )
        profile = self._get("get_instance_profile", InstanceProfileName=name)
        if profile is None:
            profile = self.call(
                "create_instance_profile", InstanceProfileName=name, Path=PATH, Tags=tags
            )
        else:
            self.call("tag_instance_profile", InstanceProfileName=name, Tags=tags)
        if not any(r["RoleName"] == name for r in profile["InstanceProfile"].get("Roles", [])):
            self.call("add_role_to_instance_profile", InstanceProfileName=name, RoleName=name)
        return name

    def delete(self, uid: str) -> None:
        """Delete the cluster's profile and role, whatever part of them exists; idempotent.
        Credentials that may not even look at IAM made no role: nothing to delete."""
        name = name_of(uid)
        try:
            profile = self._get("get_instance_profile", InstanceProfileName=name)
        except ProviderError as e:
            if not self._absent(e):
                raise
            return
        if profile is not None:
            self._gone("remove_role_from_instance_profile", InstanceProfileName=name, RoleName=name)
            self._gone("delete_instance_profile", InstanceProfileName=name)
        if self._get("get_role", RoleName=name) is not None:
            for p in self.call("list_role_policies", RoleName=name).get("PolicyNames", []):
                self._gone("delete_role_policy", RoleName=name, PolicyName=p)
            self._gone("delete_role", RoleName=name)

    def discover(self, region: str) -> list[Resource]:
        """mlcloud's roles and instance profiles (path /mlcloud/) of clusters in the region."""
        found = []
        try:
            roles = self._paged("list_roles", "Roles")
        except ProviderError as e:
            if not self._absent(e):
                raise
            return []
        for role in roles:
            tags = self.call("list_role_tags", RoleName=role["RoleName"]).get("Tags", [])
            found.append(tagged(ROLE, role["RoleName"], tags, region, role.get("CreateDate")))
        for p in self._paged("list_instance_profiles", "InstanceProfiles"):
            name = p["InstanceProfileName"]
            # listings leave tags out; GetInstanceProfile has them
            got = self.call("get_instance_profile", InstanceProfileName=name)["InstanceProfile"]
            tags = got.get("Tags", [])
            found.append(tagged(PROFILE, name, tags, region, p.get("CreateDate")))
        return [r for r in found if r.cluster_uid and r.region == region]

    def delete_found(self, resources: list[Resource]) -> None:
        """Delete what discover() found: each cluster's profile, then its role."""
        for uid in dict.fromkeys(r.cluster_uid for r in resources if r.kind in (ROLE, PROFILE)):
            self.delete(uid)

    def _paged(self, op: str, key: str) -> list[dict]:
        out, marker = [], None
        while True:
            page = self.call(op, PathPrefix=PATH, **({"Marker": marker} if marker else {}))
            out += page.get(key, [])
            marker = page.get("Marker") if page.get("IsTruncated") else None
            if not marker:
                return out

    def _get(self, op: str, **kwargs) -> dict | None:
        try:
            return self.call(op, **kwargs)
        except ProviderError as e:
            if _code(e) != "NoSuchEntity":
                raise
            return None

    def _gone(self, op: str, **kwargs) -> None:
        """A delete that may find the thing already gone (a repeated `down`, a racing gc)."""
        self._get(op, **kwargs)


def fresh_profile_refused(error: BaseException) -> bool:
    """RunInstances refusing an instance profile EC2 does not know yet (eventual consistency)."""
    text = str(error.__cause__ or error)
    return _code(error) == "InvalidParameterValue" and "iamInstanceProfile" in text


def launch_retrying(launch: Callable[[], dict], wait_s: float = FRESH_PROFILE_WAIT_S) -> dict:
    """launch(), retried with backoff while EC2 refuses a profile IAM has only just made."""
    deadline, pause = time.monotonic() + wait_s, 2.0
    while True:
        try:
            return launch()
        except ProviderError as e:
            if not fresh_profile_refused(e) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 1.5, 10.0)


def _code(error: BaseException) -> str:
    cause = error.__cause__
    response = getattr(cause, "response", None) or {}
    return response.get("Error", {}).get("Code", "")
