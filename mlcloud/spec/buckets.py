"""Bucket URIs (`s3://bucket/prefix`, `gs://bucket/prefix`): parsed and checked against each
cloud's bucket naming rules, so a typo is refused at the spec, not on a node an hour later.

Pure: no SDK, no network."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Any

SCHEMES = {"s3": "aws", "gs": "gce"}  # URI scheme -> the provider whose cloud serves it
_S3_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_GCS_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_S3_BAD_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_S3_BAD_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# IAM policies read `*`, `?` and `${...}` in a resource as wildcards and variables: a prefix
# holding them would grant more than it names
_PREFIX_BAD = re.compile(r"[*?$\x00-\x1f\x7f]")


@dataclass(frozen=True)
class BucketUri:
    scheme: str  # s3 or gs
    bucket: str
    prefix: str  # without leading or trailing slash; "" for the whole bucket

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def child(self, name: str) -> BucketUri:
        return BucketUri(self.scheme, self.bucket, f"{self.prefix}/{name}".strip("/"))


def parse(text: str) -> BucketUri:
    """`s3://bucket[/prefix]` or `gs://bucket[/prefix]`; ValueError saying what is wrong."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError("is not a bucket URI: write s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    bucket, _, prefix = rest.partition("/")
    check_bucket(scheme, bucket)
    prefix = prefix.strip("/")
    if prefix and "" in prefix.split("/"):
        raise ValueError("has an empty path segment (`//`) in its prefix")
    if _PREFIX_BAD.search(prefix):
        raise ValueError("has `*`, `?`, `$` or a control character in its prefix")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError("has `.` or `..` in its prefix")
    return BucketUri(scheme, bucket, prefix)


def check_bucket(scheme: str, name: str) -> None:
    """The bucket naming rules of S3 (general purpose buckets) and of Cloud Storage."""
    what = f"bucket name {name!r}"
    if not name:
        raise ValueError("has no bucket name")
    if scheme == "s3":
        if not _S3_NAME.fullmatch(name):
            raise ValueError(
                f"{what}: S3 bucket names are 3-63 characters of a-z, 0-9, `.` and `-`, "
                "starting and ending with a letter or digit"
            )
        if name.startswith(_S3_BAD_PREFIXES) or name.endswith(_S3_BAD_SUFFIXES):
            raise ValueError(f"{what}: S3 reserves that prefix or suffix")
    else:
        if not _GCS_NAME.fullmatch(name) or any(
            not 1 <= len(part) <= 63 for part in name.split(".")
        ):
            raise ValueError(
                f"{what}: Cloud Storage bucket names are 3-63 characters of a-z, 0-9, `-`, `_` "
                "and `.` (up to 222 with dots, 63 between dots), starting and ending with a "
                "letter or digit"
            )
        if name.startswith("goog") or "google" in name:
            raise ValueError(f"{what}: Cloud Storage refuses `goog` first or `google` anywhere")
    if ".." in name:
        raise ValueError(f"{what}: has two dots in a row")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return
    raise ValueError(f"{what}: looks like an IP address")


def checkpoint_location(spec: Any, cloud: str, name: str) -> str | None:
    """Where the jobs of `name` (a managed job, or the cluster of a plain `train`) keep
    checkpoints when they run on `cloud`'s nodes (MLCLOUD_CHECKPOINT_URI): the spec's
    storage.checkpoints for that cloud plus the name, so the next cluster of the job (another
    region, or another cloud with its own location) resumes from them. `spec` is a TaskSpec or
    its stored dict; None without a location for that cloud."""
    storage = spec.get("storage") if isinstance(spec, dict) else asdict(spec.storage)
    loc = (storage or {}).get("checkpoints")
    if isinstance(loc, dict):
        loc = loc.get(cloud)
    return str(parse(loc).child(name)) if loc else None
