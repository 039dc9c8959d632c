"""Checkpoints in a bucket (MLCLOUD_CHECKPOINT_URI, s3:// or gs://), so they outlive every node.

Imported by train.py; standard library only, plus boto3 for S3 when the node has it (the Deep
Learning AMIs do). Credentials are the node's own: an AWS instance profile, the GCE metadata
server's token, or whatever the node's environment provides; never the launching machine's.

The bucket never shows a partial checkpoint: each is uploaded under a key of its own, and only
then does the small manifest `latest.json` name it (with its size and sha256), so a reader that
goes by the manifest sees complete checkpoints only. The manifest also names the previous one,
which is kept for a reader mid-download; older ones are deleted. Uploads run in a background
thread, newest only: a checkpoint still waiting when a newer one is saved is skipped.
"""

import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

MANIFEST = "latest.json"
CHUNK = 1 << 20


def open_store(uri, say):
    """A store for the URI, or None (saying why) when this node cannot use it."""
    scheme, _, rest = uri.partition("://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if scheme == "s3":
        try:
            import boto3  # noqa: F401
        except ImportError:
            say(
                f"checkpoints: boto3 is not installed on this node, so {uri} is not used; "
                "`pip install boto3` in the job's setup to keep checkpoints in the bucket"
            )
            return None
        return S3Store(uri, bucket, prefix)
    if scheme == "gs":
        return GcsStore(uri, bucket, prefix)
    say(f"checkpoints: {uri} is not an s3:// or gs:// URI; checkpoints stay on the nodes")
    return None


def remote_step(store, say):
    """The step of the bucket's newest complete checkpoint, or -1 (none, or unreadable)."""
    try:
        manifest = store.manifest()
    except Exception as e:  # a bucket out of reach must not stop training from local disk
        say(f"checkpoints: cannot read {store.uri}/{MANIFEST}: {e}")
        return -1
    return int(manifest["step"]) if manifest else -1


def fetch_newest(store, ckpt_dir, say):
    """Download the bucket's newest complete checkpoint into ckpt_dir as ckpt-STEP.pt (checked
    against the manifest, renamed into place only when whole); its path, or None."""
    for _ in range(2):  # the manifest may move on while we read: once more from the new one
        try:
            manifest = store.manifest()
            if not manifest:
                return None
            step = int(manifest["step"])
            path = os.path.join(ckpt_dir, f"ckpt-{step:08d}.pt")
            fd, tmp = tempfile.mkstemp(dir=ckpt_dir, prefix=".fetch-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    if not store.get(manifest["key"], f):
                        continue
                    f.flush()
                    os.fsync(f.fileno())
                if _digest(tmp) != (manifest["size"], manifest["sha256"]):
                    continue
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            say(f"checkpoints: fetched step {step} from {store.uri}")
            return path
        except Exception as e:
            say(f"checkpoints: cannot fetch from {store.uri}: {e}")
            return None
    return None


class Uploader:
    """Uploads checkpoints in a background thread, newest only."""

    def __init__(self, store, say):
        self.store, self.say = store, say
        self._cond = threading.Condition()
        self._pending = None  # (step, open file) waiting for the thread
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, step, path):
        """Queue a complete checkpoint file. It is opened now, so pruning the file on disk
        while it waits or uploads does not matter."""
        f = open(path, "rb")
        with self._cond:
            if self._pending:
                self._pending[1].close()  # a newer one came: the older is never uploaded
            self._pending = (step, f)
            self._cond.notify_all()

    def close(self, timeout=600.0):
        """Wait (bounded) until the newest submitted checkpoint is uploaded, then stop."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            if self._pending or self._busy:
                self.say(f"checkpoints: upload to {self.store.uri} still running at exit")
            self._closed = True
            self._cond.notify_all()

    def _run(self):
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                (step, f), self._pending = self._pending, None
                self._busy = True
            try:
                with f:
                    self._upload(step, f)
            except Exception as e:  # the next checkpoint tries again; training goes on
                self.say(f"checkpoints: upload of step {step} to {self.store.uri} failed: {e}")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, step, f):
        size, sha256 = _digest_file(f)
        key = f"ckpt-{step:08d}-{secrets.token_hex(4)}.pt"
        f.seek(0)
        self.store.put(key, f, size)
        old = self.store.manifest() or {}
        manifest = {
            "step": step,
            "key": key,
            "size": size,
            "sha256": sha256,
            "time": time.time(),
            "previous": old.get("key"),
        }
        self.store.put_bytes(MANIFEST, json.dumps(manifest).encode())  # now it is visible
        for stale in {old.get("previous")} - {None, key, old.get("key")}:
            self.store.delete(stale)
        self.say(f"checkpoints: step {step} uploaded to {self.store.uri}")


def _digest_file(f):
    h, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(CHUNK), b""):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()


def _digest(path):
    with open(path, "rb") as f:
        return _digest_file(f)


class S3Store:
    """S3 via boto3; AWS_ENDPOINT_URL(_S3) in the job's environment points it elsewhere."""

    def __init__(self, uri, bucket, prefix):
        import boto3

        self.uri, self.bucket, self.prefix = uri, bucket, prefix
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.client("s3", endpoint_url=endpoint or None)

    def _key(self, name):
        return f"{self.prefix}/{name}" if self.prefix else name

    def manifest(self):
        data = self.get_bytes(MANIFEST)
        return json.loads(data) if data else None

    def get_bytes(self, name):
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def get(self, name, f):
        from botocore.exceptions import ClientError

        try:
            self.client.download_fileobj(self.bucket, self._key(name), f)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return False
            raise

    def put(self, name, f, size):
        self.client.upload_fileobj(f, self.bucket, self._key(name))

    def put_bytes(self, name, data):
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def delete(self, name):
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))


class GcsStore:
    """Cloud Storage through its JSON API with the standard library. The token comes from the
    GCE metadata server (the node's service account), else from google-auth's default
    credentials when installed; STORAGE_EMULATOR_HOST points it at an emulator (no token)."""

    SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"

    def __init__(self, uri, bucket, prefix):
        self.uri, self.bucket, self.prefix = uri, bucket, prefix
        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
        if emulator and "://" not in emulator:
            emulator = "http://" + emulator
        self.base = (emulator or "https://storage.googleapis.com").rstrip("/")
        self.emulated = bool(emulator)
        self._token, self._expires = None, 0.0

    def _object(self, name, media=False):
        key = f"{self.prefix}/{name}" if self.prefix else name
        quoted = urllib.parse.quote(key, safe="")
        url = f"{self.base}/storage/v1/b/{self.bucket}/o/{quoted}"
        return url + "?alt=media" if media else url

    def _headers(self):
        if self.emulated:
            return {}
        if self._token is None or time.time() > self._expires:
            self._token, self._expires = self._fetch_token()
        return {"Authorization": f"Bearer {self._token}"}

    def _fetch_token(self):
        host = os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
        url = f"http://{host}/computeMetadata/v1/instance/service-accounts/default/token"
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                answer = json.loads(r.read())
            return answer["access_token"], time.time() + int(answer["expires_in"]) - 60
        except (OSError, ValueError, KeyError):
            pass  # not on GCE: the node's own default credentials, if google-auth is there
        try:
            import google.auth
            import google.auth.transport.requests
        except ImportError:
            raise RuntimeError(
                "no token: neither the GCE metadata server nor google-auth is available"
            ) from None
        credentials, _ = google.auth.default(scopes=[self.SCOPE])
        credentials.refresh(google.auth.transport.requests.Request())
        return credentials.token, time.time() + 300

    def _open(self, method, url, body=None, headers=None):
        request = urllib.request.Request(
            url, data=body, method=method, headers={**self._headers(), **(headers or {})}
        )
        return urllib.request.urlopen(request, timeout=60)

    def manifest(self):
        data = self.get_bytes(MANIFEST)
        return json.loads(data) if data else None

    def get_bytes(self, name):
        try:
            with self._open("GET", self._object(name, media=True)) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def get(self, name, f):
        try:
            with self._open("GET", self._object(name, media=True)) as r:
                for block in iter(lambda: r.read(CHUNK), b""):
                    f.write(block)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise

    def put(self, name, f, size):
        key = f"{self.prefix}/{name}" if self.prefix else name
        url = (
            f"{self.base}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name="
            + urllib.parse.quote(key, safe="")
        )
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with self._open("POST", url, body=f, headers=headers):
            pass

    def put_bytes(self, name, data):
        import io

        self.put(name, io.BytesIO(data), len(data))

    def delete(self, name):
        try:
            with self._open("DELETE", self._object(name)):
                pass
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
