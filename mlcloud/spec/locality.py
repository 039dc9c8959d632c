"""Compute goes to the data: where a bucket lives, and what reading it from elsewhere costs.

A bucket's region is asked of its cloud once and kept in $MLCLOUD_HOME/cache/buckets.json
(a bucket never moves). Egress figures are public list prices per GB (late 2026, first pricing
tier), for an estimate shown next to the plan, not a quote."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from mlcloud.errors import UsageError
from mlcloud.spec import buckets

CACHE_DAYS = 30  # a bucket deleted and made again elsewhere is found again after this

# USD per GB read out of the data's region, by (data provider, where the compute is)
EGRESS_USD_PER_GB = {
    ("aws", "same-provider"): 0.02,  # EC2/S3 inter-region transfer
    ("gce", "same-provider"): 0.02,  # GCS/GCE inter-region within a continent
    ("aws", "internet"): 0.09,  # S3 to the internet (another cloud)
    ("gce", "internet"): 0.12,  # GCS to the internet (another cloud)
}


@dataclass(frozen=True)
class DataPlace:
    provider: str | None  # None: a bare region name, provider unknown
    region: str


def locate(near: str, aws_session=None, where: str = "--near") -> DataPlace:
    """REGION, s3://bucket[/prefix] or gs://bucket[/prefix] -> where the data is."""
    for scheme, lookup in (("s3", _s3_region), ("gs", _gcs_region)):
        if near.startswith(f"{scheme}://"):
            bucket = near[len(scheme) + 3 :].split("/", 1)[0]
            key = f"{scheme}://{bucket}"
            region = _cached(key)
            if region is None:
                if os.environ.get("MLCLOUD_OFFLINE"):
                    raise UsageError(
                        f"{where} {key}: MLCLOUD_OFFLINE is set and its region is not "
                        "cached; give its region instead: --near REGION"
                    )
                region = lookup(bucket, aws_session, where)
                _remember(key, region)
            return DataPlace(buckets.SCHEMES[scheme], region)
    if "://" in near or not near.replace("-", "").isalnum():
        raise UsageError(f"{where}: {near!r} is not a region, s3://bucket or gs://bucket")
    return DataPlace(None, near)


def locate_data(
    uris: tuple[str, ...], warn: Callable[[str], None], aws_session=None
) -> DataPlace | None:
    """Where the spec's `storage.data` is (its first URI), for `up` without --near. A lookup
    that cannot be made (offline, no credentials, no permission) does not stop `up`: it is
    said, with what was assumed, and the cluster goes where it would have gone."""
    if not uris:
        return None
    try:
        place = locate(uris[0], aws_session, where="storage.data")
    except UsageError as e:
        warn(f"{e}; assumed the data is wherever the cluster goes (no egress estimate)")
        return None
    if len(uris) > 1:
        warn(f"storage.data spans several buckets: compute goes near the first, {uris[0]}")
    return place


def _s3_region(bucket: str, session, where: str) -> str:
    """GetBucketLocation; where that is not allowed, HeadBucket, whose answer (even a 403 or
    a 301) carries the bucket's region in a header."""
    from botocore.exceptions import BotoCoreError, ClientError

    if session is None:
        from mlcloud import botosession

        session = botosession.session()
    try:
        s3 = session.client("s3")
        try:
            loc = s3.get_bucket_location(Bucket=bucket)["LocationConstraint"]
            return loc or "us-east-1"  # S3 answers None for us-east-1
        except ClientError as e:
            if e.response["Error"].get("Code") not in ("AccessDenied", "AllAccessDisabled"):
                raise
            try:
                answer = s3.head_bucket(Bucket=bucket)
            except ClientError as head_error:
                answer = head_error.response
            region = (
                answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
            )
            if not region:
                raise
            return region
    except ClientError as e:
        raise UsageError(
            f"{where} s3://{bucket}: {e.response['Error'].get('Code')}: "
            f"{e.response['Error'].get('Message')}"
        ) from None
    except BotoCoreError as e:
        raise UsageError(
            f"{where} s3://{bucket}: cannot look the bucket up ({e}); "
            "give its region instead: --near REGION"
        ) from None


def _gcs_region(bucket: str, session, where: str) -> str:
    try:
        from google.cloud import storage  # optional: not a dependency of mlcloud
    except ImportError:
        raise UsageError(
            f"{where} gs://{bucket}: looking a GCS bucket up needs "
            "google-cloud-storage; give its region instead: --near REGION"
        ) from None
    try:
        return storage.Client().get_bucket(bucket).location.lower()
    except Exception as e:  # the client's errors are many; any of them means "cannot tell"
        raise UsageError(
            f"{where} gs://{bucket}: cannot look the bucket up ({e}); "
            "give its region instead: --near REGION"
        ) from None


def _cache_path():
    from mlcloud.state import paths

    return paths.home() / "cache" / "buckets.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached(key: str) -> str | None:
    entry = _read_cache().get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("region"), str):
        return None
    if time.time() - float(entry.get("time") or 0) > CACHE_DAYS * 86400:
        return None
    return entry["region"]


def _remember(key: str, region: str) -> None:
    """Best effort: a home that cannot take the file only costs a lookup next time."""
    from mlcloud.state import atomic, paths

    try:
        path = _cache_path()
        paths.private_dir(path.parent)
        data = {**_read_cache(), key: {"region": region, "time": time.time()}}
        atomic.write(path, json.dumps(data, indent=1).encode())
    except OSError:
        pass


def egress_per_gb(data: DataPlace, provider: str, region: str) -> float:
    """What reading a GB of the data costs from compute in (provider, region)."""
    if data.region == region and data.provider in (None, provider):
        return 0.0
    if data.provider is None or data.provider == provider:
        return EGRESS_USD_PER_GB[(data.provider or provider, "same-provider")]
    return EGRESS_USD_PER_GB[(data.provider, "internet")]
