"""Copy a job's newest complete checkpoint between two bucket locations (s3:// <-> gs://), on
the launching machine with the user's own credentials, when a managed job moves to a cloud
whose nodes keep checkpoints elsewhere (docs/architecture.md, "The job's environment").

The layout is the node side's (templates/ddp/checkpoint_store.py): objects under the prefix,
and `latest.json` naming the newest complete one (step, key, size, sha256, previous). The copy
reads the source manifest first, streams the object it names to a local spool while hashing
it, refuses unless size and sha256 match the manifest, uploads it under the same key, checks
the size (and, on GCS, the MD5) the destination reports, and only then writes the destination
manifest, last: a reader at the destination sees the old checkpoint or the whole new one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from mlcloud.errors import MlcloudError
from mlcloud.spec import buckets

MANIFEST = "latest.json"
CHUNK = 1 << 20


class CheckpointCopyError(MlcloudError):
    """The copy could not be made or verified; the destination manifest was not written."""


@dataclass(frozen=True)
class Copied:
    step: int
    key: str  # the object's name under both prefixes
    size: int
    source: str
    destination: str
    already: bool  # the destination's manifest named this checkpoint already: nothing sent


def copy_newest(source: str, destination: str) -> Copied | None:
    """Copy the newest complete checkpoint at `source` to `destination` (bucket URIs, each the
    location + the job's name, as buckets.checkpoint_location gives them). None when the
    source has none yet. CheckpointCopyError, in one line, when a read, write or check fails."""
    src, dst = _open(source), _open(destination)
    manifest = _manifest(src)
    if manifest is None:
        return None
    step, key, size, sha256 = _fields(manifest, src.uri)
    old = _manifest(dst) or {}
    if (old.get("key"), old.get("sha256"), old.get("size")) == (key, sha256, size):
        return Copied(step, key, size, source, destination, already=True)
    with tempfile.TemporaryFile(prefix="mlcloud-ckpt-") as spool:
        digest, md5, got = hashlib.sha256(), hashlib.md5(), 0  # noqa: S324 - GCS's checksum
        try:
            if not src.get(key, _Tee(spool, digest, md5)):
                raise CheckpointCopyError(
                    f"checkpoint copy: {src.uri}/{MANIFEST} names {key}, which is not there "
                    "(the source moved on while copying: try again)"
                )
            got = spool.tell()
        except CheckpointCopyError:
            raise
        except Exception as e:
            raise CheckpointCopyError(f"checkpoint copy: cannot read {src.uri}/{key}: {e}") from e
        if (got, digest.hexdigest()) != (size, sha256):
            raise CheckpointCopyError(
                f"checkpoint copy: {src.uri}/{key} does not match its manifest (size {got} of "
                f"{size}, sha256 {digest.hexdigest()[:12]} not {sha256[:12]}); nothing written "
                f"to {dst.uri}/{MANIFEST}"
            )
        spool.seek(0)
        try:
            stored = dst.put(key, spool, size, md5.digest())
        except Exception as e:
            raise CheckpointCopyError(
                f"checkpoint copy: cannot write {dst.uri}/{key}: {e}; nothing written to "
                f"{dst.uri}/{MANIFEST}"
            ) from e
    if stored != size:
        raise CheckpointCopyError(
            f"checkpoint copy: {dst.uri}/{key} holds {stored} bytes, not {size}; nothing "
            f"written to {dst.uri}/{MANIFEST}"
        )
    new = dict(manifest, previous=old.get("key"), copied_from=src.uri, copied_at=time.time())
    try:
        dst.put_bytes(MANIFEST, json.dumps(new).encode())  # now it is visible
        for stale in {old.get("previous")} - {None, key, old.get("key")}:
            dst.delete(stale)
    except Exception as e:
        raise CheckpointCopyError(f"checkpoint copy: cannot write {dst.uri}/{MANIFEST}: {e}") from e
    return Copied(step, key, size, source, destination, already=False)


def _fields(manifest: dict, uri: str) -> tuple[int, str, int, str]:
    try:
        step, key = int(manifest["step"]), str(manifest["key"])
        size, sha256 = int(manifest["size"]), str(manifest["sha256"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointCopyError(
            f"checkpoint copy: {uri}/{MANIFEST} is not a checkpoint manifest (step, key, size, "
            "sha256)"
        ) from None
    if not key or "/" in key or key in (".", "..", MANIFEST):
        raise CheckpointCopyError(f"checkpoint copy: {uri}/{MANIFEST} names a bad key {key!r}")
    return step, key, size, sha256


def _manifest(store) -> dict | None:
    try:
        data = store.get_bytes(MANIFEST)
    except Exception as e:
        raise CheckpointCopyError(
            f"checkpoint copy: cannot read {store.uri}/{MANIFEST}: {e}"
        ) from e
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise CheckpointCopyError(f"checkpoint copy: {store.uri}/{MANIFEST} is not JSON")
    return manifest


class _Tee:
    """A writable file that hashes what passes through it."""

    def __init__(self, f: IO[bytes], *hashes) -> None:
        self.f, self.hashes = f, hashes

    def write(self, data: bytes) -> int:
        for h in self.hashes:
            h.update(data)
        return self.f.write(data)


def _open(uri: str):
    try:
        loc = buckets.parse(uri)
    except ValueError as e:
        raise CheckpointCopyError(f"checkpoint copy: {uri!r} {e}") from None
    return _S3(loc) if loc.scheme == "s3" else _Gcs(loc)


class _S3:
    """S3 with boto3's default credentials (AWS_ENDPOINT_URL honoured by boto3 itself)."""

    def __init__(self, loc: buckets.BucketUri) -> None:
        import boto3

        self.uri, self.loc = str(loc), loc
        self.client = boto3.client("s3")

    def _key(self, name: str) -> str:
        return f"{self.loc.prefix}/{name}" if self.loc.prefix else name

    @staticmethod
    def _missing(e) -> bool:
        return e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")

    def get_bytes(self, name: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.loc.bucket, Key=self._key(name))[
                "Body"
            ].read()
        except ClientError as e:
            if self._missing(e):
                return None
            raise

    def get(self, name: str, f) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.download_fileobj(self.loc.bucket, self._key(name), f)
            return True
        except ClientError as e:
            if self._missing(e):
                return False
            raise

    def put(self, name: str, f, size: int, md5: bytes) -> int:
        self.client.upload_fileobj(f, self.loc.bucket, self._key(name))
        head = self.client.head_object(Bucket=self.loc.bucket, Key=self._key(name))
        return int(head["ContentLength"])

    def put_bytes(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.loc.bucket, Key=self._key(name), Body=data)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.loc.bucket, Key=self._key(name))


class _Gcs:
    """Cloud Storage's JSON API over google-auth's AuthorizedSession."""

    def __init__(self, loc: buckets.BucketUri) -> None:
        from urllib.parse import quote

        from google.auth.exceptions import DefaultCredentialsError

        from mlcloud.providers.gce import gcs

        self.uri, self.loc, self._quote = str(loc), loc, quote
        self.base = gcs.base()
        try:
            self.session = gcs.session()
        except DefaultCredentialsError as e:
            raise CheckpointCopyError(
                f"checkpoint copy: no Google credentials for {loc}: {e}"
            ) from None

    def _key(self, name: str) -> str:
        return f"{self.loc.prefix}/{name}" if self.loc.prefix else name

    def _url(self, name: str) -> str:
        return (
            f"{self.base}/storage/v1/b/{self.loc.bucket}/o/{self._quote(self._key(name), safe='')}"
        )

    @staticmethod
    def _check(r) -> None:
        from mlcloud.providers.gce import gcs

        if r.status_code >= 400:
            raise RuntimeError(f"HTTP {r.status_code}: {gcs.error_text(r)}")

    def get_bytes(self, name: str) -> bytes | None:
        r = self.session.get(self._url(name), params={"alt": "media"}, timeout=60)
        if r.status_code == 404:
            return None
        self._check(r)
        return r.content

    def get(self, name: str, f) -> bool:
        with self.session.get(
            self._url(name), params={"alt": "media"}, stream=True, timeout=60
        ) as r:
            if r.status_code == 404:
                return False
            self._check(r)
            for block in r.iter_content(CHUNK):
                f.write(block)
        return True

    def _upload(self, name: str, body, size: int) -> dict:
        r = self.session.post(
            f"{self.base}/upload/storage/v1/b/{self.loc.bucket}/o",
            params={"uploadType": "media", "name": self._key(name)},
            data=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=600,
        )
        self._check(r)
        return r.json()

    def put(self, name: str, f, size: int, md5: bytes) -> int:
        res = self._upload(name, f, size)
        if base64.b64decode(res.get("md5Hash", "")) != md5:
            raise RuntimeError("the stored object's MD5 differs from the bytes sent")
        return int(res["size"])

    def put_bytes(self, name: str, data: bytes) -> None:
        self._upload(name, data, len(data))

    def delete(self, name: str) -> None:
        r = self.session.delete(self._url(name), timeout=60)
        if r.status_code != 404:
            self._check(r)
