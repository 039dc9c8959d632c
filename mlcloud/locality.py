"""Compute goes to the data: where a bucket lives, and what reading it from elsewhere costs.

Egress figures are public list prices per GB (late 2026, first pricing tier), for an estimate
shown next to the plan, not a quote."""

from __future__ import annotations

from dataclasses import dataclass

from mlcloud.errors import UsageError

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


def locate(near: str, aws_session=None) -> DataPlace:
    """REGION, s3://bucket[/prefix] or gs://bucket[/prefix] -> where the data is."""
    if near.startswith("s3://"):
        bucket = near[5:].split("/", 1)[0]
        return DataPlace("aws", _s3_region(bucket, aws_session))
    if near.startswith("gs://"):
        bucket = near[5:].split("/", 1)[0]
        return DataPlace("gce", _gcs_region(bucket))
    if "://" in near or not near.replace("-", "").isalnum():
        raise UsageError(f"--near: {near!r} is not a region, s3://bucket or gs://bucket")
    return DataPlace(None, near)


def _s3_region(bucket: str, session) -> str:
    from botocore.exceptions import BotoCoreError, ClientError

    if session is None:
        import boto3

        session = boto3.session.Session()
    try:
        loc = session.client("s3").get_bucket_location(Bucket=bucket)["LocationConstraint"]
    except ClientError as e:
        raise UsageError(
            f"--near s3://{bucket}: {e.response['Error'].get('Code')}: "
            f"{e.response['Error'].get('Message')}"
        ) from None
    except BotoCoreError as e:
        raise UsageError(
            f"--near s3://{bucket}: cannot look the bucket up ({e}); "
            "give its region instead: --near REGION"
        ) from None
    return loc or "us-east-1"  # S3 answers None for us-east-1


def _gcs_region(bucket: str) -> str:
    try:
        from google.cloud import storage  # optional: not a dependency of mlcloud
    except ImportError:
        raise UsageError(
            f"--near gs://{bucket}: looking a GCS bucket up needs "
            "google-cloud-storage; give its region instead: --near REGION"
        ) from None
    try:
        return storage.Client().get_bucket(bucket).location.lower()
    except Exception as e:  # the client's errors are many; any of them means "cannot tell"
        raise UsageError(
            f"--near gs://{bucket}: cannot look the bucket up ({e}); "
            "give its region instead: --near REGION"
        ) from None


def egress_per_gb(data: DataPlace, provider: str, region: str) -> float:
    """What reading a GB of the data costs from compute in (provider, region)."""
    if data.region == region and data.provider in (None, provider):
        return 0.0
    if data.provider is None or data.provider == provider:
        return EGRESS_USD_PER_GB[(data.provider or provider, "same-provider")]
    return EGRESS_USD_PER_GB[(data.provider, "internet")]
