"""Copy a job's newest complete checkpoint between two bucket locations (s3:// <-> gs://), on
the launching machine with the user's own credentials, when a managed job moves to a cloud
whose nodes keep checkpoints elsewhere (docs/architecture.md, "The job's environment").

The layout is the node side's (templates/checkpoints.py): a checkpoint's files as objects under
the prefix (KEY/NAME, KEY/NAME/PATH for a directory's), and `latest.json` naming the newest
complete one (step, name, key, files: [object, path, size, sha256], previous). The copy reads
the source manifest first; each file is streamed to a local spool while hashed, refused unless
size and sha256 match the manifest, uploaded under the same object name, and checked by the
size (and, on GCS, the MD5) the destination reports. Only then is the destination manifest
written, last: a reader there sees the old checkpoint or the whole new one. A failed copy
removes what it uploaded and writes no manifest.
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
    name: str  # the checkpoint's name (a file's, or a directory's)
    size: int  # bytes, all its files
    source: str
    destination: str
    already: bool  # the destination's manifest named this checkpoint already: nothing sent


@dataclass(frozen=True)
class _File:
    obj: str  # the object's name under the prefix
    path: str  # inside the checkpoint ("" for a file)
    size: int
    sha256: str


def copy_newest(source: str, destination: str) -> Copied | None:
    """Copy the newest complete checkpoint at `source` to `destination` (bucket URIs, each the
    location + the job's name, as buckets.checkpoint_location gives them). None when the
    source has none yet. CheckpointCopyError, in one line, when a read, write or check fails."""
    src, dst = _open(source), _open(destination)
    manifest = _manifest(src)
    if manifest is None:
        return None
    step, name, files = _fields(manifest, src.uri)
    total = sum(f.size for f in files)
    old = _manifest(dst) or {}
    if old.get("files") == manifest.get("files") and old.get("step") == manifest.get("step"):
        return Copied(step, name, total, source, destination, already=True)
    sent: list[str] = []
    try:
        for f in files:
            sent.append(f.obj)  # removed again if anything fails, this one included
            _copy_file(src, dst, f)
    except CheckpointCopyError:
        _forget(dst, sent)
        raise
    previous = _record(old) if old else None
    new = dict(manifest, previous=previous, copied_from=src.uri, copied_at=time.time())
    try:
        dst.put_bytes(MANIFEST, json.dumps(new).encode())  # now it is visible
    except Exception as e:
        _forget(dst, sent)
        raise CheckpointCopyError(
            f"checkpoint copy: cannot write {dst.uri}/{MANIFEST}: {_short(e)}"
        ) from e
    stale = (old.get("previous") or {}) if isinstance(old.get("previous"), dict) else {}
    keep = {f.obj for f in files} | {o for o, *_ in _pairs(old.get("files"))}
    _forget(dst, [o for o, *_ in _pairs(stale.get("files")) if o not in keep])
    return Copied(step, name, total, source, destination, already=False)


def _copy_file(src, dst, f: _File) -> None:
    """One file through a local spool: read and hashed, checked, written, checked again."""
    nothing = f"nothing written to {dst.uri}/{MANIFEST}"
    with tempfile.TemporaryFile(prefix="mlcloud-ckpt-") as spool:
        digest, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 - GCS's own checksum
        try:
            found = src.get(f.obj, _Tee(spool, digest, md5))
        except Exception as e:
            raise CheckpointCopyError(
                f"checkpoint copy: cannot read {src.uri}/{f.obj}: {_short(e)}; {nothing}"
            ) from e
        if not found:
            raise CheckpointCopyError(
                f"checkpoint copy: {src.uri}/{MANIFEST} names {f.obj}, which is not there "
                f"(the source moved on while copying: try again); {nothing}"
            )
        got = spool.tell()
        if (got, digest.hexdigest()) != (f.size, f.sha256):
            raise CheckpointCopyError(
                f"checkpoint copy: {src.uri}/{f.obj} does not match its manifest (size {got} "
                f"of {f.size}, sha256 {digest.hexdigest()[:12]} not {f.sha256[:12]}); {nothing}"
            )
        spool.seek(0)
        try:
            stored = dst.put(f.obj, spool, f.size, md5.digest())
        except Exception as e:
            raise CheckpointCopyError(
                f"checkpoint copy: cannot write {dst.uri}/{f.obj}: {_short(e)}; {nothing}"
            ) from e
    if stored != f.size:
        raise CheckpointCopyError(
            f"checkpoint copy: {dst.uri}/{f.obj} holds {stored} bytes, not {f.size}; {nothing}"
        )


def _pairs(files) -> list:
    return [f for f in files or [] if isinstance(f, list | tuple) and f]


def _record(manifest: dict) -> dict | None:
    """What the destination's next manifest keeps of its current one as `previous`."""
    try:
        _, _, files = _fields(manifest, "")
    except CheckpointCopyError:
        return None  # not one a node wrote: nothing of it is kept or removed
    return {"key": manifest.get("key"), "files": [[f.obj, f.path, f.size, f.sha256] for f in files]}


def _fields(manifest: dict, uri: str) -> tuple[int, str, list[_File]]:
    """(step, name, files) of a manifest, also one the DDP template wrote before the node side
    did (one object `key` with its size and sha256); every name checked."""
    bad = CheckpointCopyError(
        f"checkpoint copy: {uri}/{MANIFEST} is not a checkpoint manifest (step, name, files)"
    )
    try:
        step = int(manifest["step"])
        if "files" in manifest:
            name = str(manifest["name"])
            files = [_File(str(o), str(p), int(n), str(h)) for o, p, n, h in manifest["files"]]
        else:
            name = f"ckpt-{step:08d}.pt"
            key = str(manifest["key"])
            files = [_File(key, "", int(manifest["size"]), str(manifest["sha256"]))]
    except (KeyError, TypeError, ValueError):
        raise bad from None
    if not files or not name or "/" in name or name in (".", ".."):
        raise bad
    for f in files:
        parts = f.obj.split("/")
        if f.obj == MANIFEST or f.obj.startswith("/") or {"", ".", ".."} & set(parts):
            raise CheckpointCopyError(
                f"checkpoint copy: {uri}/{MANIFEST} names a bad object {f.obj!r}"
            )
    return step, name, files


def _manifest(store) -> dict | None:
    try:
        data = store.get_bytes(MANIFEST)
    except Exception as e:
        raise CheckpointCopyError(
            f"checkpoint copy: cannot read {store.uri}/{MANIFEST}: {_short(e)}"
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


def _forget(store, objects: list[str]) -> None:
    """Remove objects; one left behind costs a little storage, never a wrong checkpoint."""
    for obj in objects:
        try:
            store.delete(obj)
        except Exception:  # noqa: S110 - best effort, as the node side does
            pass


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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
        from mlcloud import botosession

        self.uri, self.loc = str(loc), loc
        self.client = botosession.session().client("s3")

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


def manifest(uri: str) -> dict | None:
    """The manifest of the newest complete checkpoint at `uri` (its step and `time`), None
    when there is none yet: how old the job's newest checkpoint is (control/mover.py)."""
    return _manifest(_open(uri))
