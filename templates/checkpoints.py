"""Durable checkpoints on the node: the bucket's newest complete checkpoint restored before a
job starts, and each new complete one uploaded while it runs, whatever the job's script.

node_ctl.py runs this with the job's environment when it names MLCLOUD_CHECKPOINT_URI
(s3://... or gs://...) and MLCLOUD_CHECKPOINT_DIR (docs/architecture.md, "Durable
checkpoints"): `checkpoints.py restore` before the job's processes start, `checkpoints.py
upload` beside them, tagged like them; the upload's stdin closing is the job's end, after which
it makes one last pass and exits. Standard library only, plus boto3 for S3 when the node has
it; Cloud Storage through its JSON API (STORAGE_EMULATOR_HOST when set, else
storage.googleapis.com with the metadata server's token). Every line it says goes into the
job's output.log in one write.

What a checkpoint is, is `pull --checkpoints`'s convention (send.py, installed beside this
file): the entry of the directory with the highest step number in its name, a file or a
directory; hidden, .tmp and .partial names are still being written. An entry is uploaded once
two looks a poll apart saw the same sizes and times and nothing changed while it was read, so a
script that writes in place is not caught half-way.

The bucket: each checkpoint's files under a key of their own (KEY/NAME, or KEY/NAME/PATH for a
directory's), then the manifest latest.json names them with sizes and sha256 digests, so a
reader going by the manifest sees complete checkpoints only. The previous one is kept (a reader
may be mid-download); older ones are deleted.

Which node uploads: every node runs this and uploads only a step newer than the manifest's;
node rank 0 at once, node K once the manifest stayed behind for K x STAGGER_S, so a step that
every node holds (the DDP template) or rank 0's node holds travels once, and one only another
node holds (a script that saves on global rank 0, placed anywhere by rendezvous) still goes.
"""

import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import send  # beside this file on a node: the checkpoint naming convention

MANIFEST = "latest.json"
CHUNK = 1 << 20
POLL_S = 1.0  # how often the checkpoint directory is looked at
STAGGER_S = 15.0  # node K waits K times this before uploading a step the manifest lacks
RETRY_S = 30.0  # a failed upload is tried again this much later (a newer step at once)
RESTORE_PREFIX = ".mlcloud-restore-"  # hidden: in progress by the convention


def say(text):
    """One line in one write(2): the job's processes share the log."""
    data = (text + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


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


class Manifest:
    """latest.json: the newest complete checkpoint in the bucket. `files` are (object, path
    in the checkpoint ("" for a file), size, sha256). A manifest the DDP template wrote before
    the node did this (one object `key`, size, sha256) reads as ckpt-STEP.pt."""

    def __init__(self, d):
        self.step = int(d["step"])
        if "files" in d:
            self.name, self.key = str(d["name"]), str(d["key"])
            self.files = [(str(o), str(p), int(n), str(h)) for o, p, n, h in d["files"]]
        else:
            self.name, self.key = f"ckpt-{self.step:08d}.pt", str(d["key"])
            self.files = [(self.key, "", int(d["size"]), str(d["sha256"]))]
        prev = d.get("previous")
        if isinstance(prev, str):  # the template's: one object
            prev = {"key": prev, "files": [[prev, "", 0, ""]]}
        self.previous = prev
        _check_name(self.name)
        for _, path, _, _ in self.files:
            _check_path(path)

    def record(self):
        """What the next manifest keeps of this one as its `previous`."""
        return {"key": self.key, "files": [list(f) for f in self.files]}


def _check_name(name):
    if not name or "/" in name or name in (".", "..") or send.in_progress(name):
        raise ValueError(f"the manifest names {name!r}, not a checkpoint")


def _check_path(path):
    if path and (path.startswith("/") or {"", ".", ".."} & set(path.split("/"))):
        raise ValueError(f"the manifest names an unsafe path {path!r}")


def read_manifest(store):
    data = store.get_bytes(MANIFEST)
    return Manifest(json.loads(data)) if data else None


def local_step(ckpt_dir):
    """The step of the directory's newest complete checkpoint, or None."""
    name = send.newest_checkpoint(ckpt_dir)
    return None if name is None else send.step_of(name)


def restore(store, ckpt_dir, say):
    """Bring the bucket's newest complete checkpoint into ckpt_dir when the directory lacks it
    (nothing of that step or newer): downloaded into a hidden temporary, each file checked
    against the manifest's size and sha256, then renamed into place. The step, or None."""
    os.makedirs(ckpt_dir, exist_ok=True)
    have = local_step(ckpt_dir)
    for _ in range(2):  # the manifest may move on while we read: once more from the new one
        try:
            m = read_manifest(store)
            if m is None or (have is not None and have >= m.step):
                return None
            if _download(store, m, ckpt_dir):
                say(f"checkpoints: restored step {m.step} from {store.uri}")
                return m.step
        except Exception as e:  # out of reach: the job starts from the node's disk
            why = _why(e)
            say(f"checkpoints: cannot restore from {store.uri}: {why}; starting from local disk")
            return None
    say(f"checkpoints: {store.uri} changed twice while restoring; starting from local disk")
    return None


def _download(store, m, ckpt_dir):
    """True once m's checkpoint is in place, False when an object did not match (moved on)."""
    tmp = tempfile.mkdtemp(dir=ckpt_dir, prefix=RESTORE_PREFIX)
    try:
        target = os.path.join(tmp, m.name)
        for obj, path, size, sha256 in m.files:
            dest = os.path.join(target, *path.split("/")) if path else target
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                if not store.get(obj, f):
                    return False
                f.flush()
                os.fsync(f.fileno())
            if _digest(dest) != (size, sha256):
                return False
        final = os.path.join(ckpt_dir, m.name)
        if os.path.isdir(target) and os.path.lexists(final):
            return True  # came meanwhile (another writer): the disk has it
        os.replace(target, final)
        _fsync_dir(ckpt_dir)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Uploader:
    """Uploads the newest complete checkpoint of a directory whenever it is newer than what
    the bucket holds. `poll()` is one look; `final()` the last pass once the job ended."""

    def __init__(self, store, ckpt_dir, rank, say, clock=time.monotonic):
        self.store, self.dir, self.rank, self.say, self.clock = store, ckpt_dir, rank, say, clock
        self.done = -1  # the bucket holds this step or a newer one
        self.seen = None  # (name, signature) at the last look
        self.behind = {}  # step -> when the manifest was first seen behind it
        self.failed = {}  # step -> when its upload failed
        self.said = set()  # what is said once

    def poll(self, final=False):
        """One look: "idle" (nothing new), "waiting" (not yet: unsettled, or another node's
        turn), "uploaded" or "failed"."""
        name = send.newest_checkpoint(self.dir)
        if name is None:
            return "idle"
        step = send.step_of(name)
        if step is None:
            self._once(
                "unnumbered",
                f"checkpoints: {name} has no step number in its name, so it is not uploaded "
                "(name checkpoints like ckpt-<step>)",
            )
            return "idle"
        if step <= self.done:
            return "idle"
        now = self.clock()
        if step in self.failed and now - self.failed[step] < RETRY_S and not final:
            return "waiting"
        path = os.path.join(self.dir, name)
        sig = _signature(path)
        settled = self.seen == (name, sig)
        self.seen = (name, sig)
        if sig is None:  # gone meanwhile, or a directory with no file in it yet
            return "idle" if final else "waiting"
        if not (settled or final):
            return "waiting"
        try:
            m = read_manifest(self.store)
            if m is not None and m.step >= step:
                self.done = m.step
                return "idle"
            since = self.behind.setdefault(step, now)
            if now - since < self.rank * STAGGER_S:
                return "waiting"
            wrote = self._upload(name, step, path, sig)
            if wrote is None:
                return "waiting"  # changed while read: the next look takes it again
        except Exception as e:  # the next checkpoint tries again; training goes on
            self.failed[step] = now
            self._once(
                "unreachable",
                f"checkpoints: cannot upload step {step} to {self.store.uri}: {_why(e)}; "
                "checkpoints stay on this node's disk, and later ones are tried",
            )
            return "failed"
        self.done = step
        if not wrote:  # another node's came first
            return "idle"
        self.say(f"checkpoints: step {step} uploaded to {self.store.uri}")
        return "uploaded"

    def final(self, sleep=time.sleep):
        """The pass at the job's end: the newest checkpoint goes up without waiting to settle;
        node K still gives the others their turn first."""
        while self.poll(final=True) == "waiting":
            sleep(POLL_S)

    def _upload(self, name, step, path, sig):
        """True once the manifest names this checkpoint, False when another node's of the same
        step or newer came first, None when it changed while read."""
        key = f"{step:08d}-{secrets.token_hex(4)}"
        files = []
        for rel, size, mtime in sig:
            full = os.path.join(path, *rel.split("/")) if rel else path
            obj = f"{key}/{name}" + (f"/{rel}" if rel else "")
            try:
                f = open(full, "rb")
            except FileNotFoundError:
                _forget(self.store, files)
                return None
            with f:
                st = os.fstat(f.fileno())
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    _forget(self.store, files)
                    return None
                got, sha256 = _digest_file(f)
                f.seek(0)
                self.store.put(obj, f, size)
            files.append([obj, rel, got, sha256])
        if _signature(path) != sig:
            _forget(self.store, files)
            return None
        latest = read_manifest(self.store)  # another node may have been quicker
        if latest is not None and latest.step >= step:
            _forget(self.store, files)
            return False
        manifest = {
            "step": step,
            "name": name,
            "key": key,
            "files": files,
            "time": time.time(),
            "node": self.rank,
            "previous": latest.record() if latest else None,
        }
        self.store.put_bytes(MANIFEST, json.dumps(manifest).encode())  # now it is visible
        if latest is not None and latest.previous:
            _forget(self.store, latest.previous.get("files") or [])
        return True

    def _once(self, what, line):
        if what not in self.said:
            self.said.add(what)
            self.say(line)


def _forget(store, files):
    for f in files:
        try:
            store.delete(f[0])
        except Exception:  # left behind: costs a little storage, never a wrong checkpoint
            pass


def _signature(path):
    """[(path inside the checkpoint, size, mtime_ns)] of its regular files, "" for a file; None
    when it is gone or holds nothing to upload."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISREG(st.st_mode):
        return [("", st.st_size, st.st_mtime_ns)]
    if not stat.S_ISDIR(st.st_mode):
        return None
    found = []
    for top, dirs, names in os.walk(path):
        dirs.sort()
        for n in sorted(names):
            full = os.path.join(top, n)
            try:
                s = os.lstat(full)
            except FileNotFoundError:
                return None
            if stat.S_ISREG(s.st_mode):
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                found.append((rel, s.st_size, s.st_mtime_ns))
    return found or None


def _digest_file(f):
    h, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(CHUNK), b""):
        h.update(block)
        size += len(block)
    return size, h.hexdigest()


def _digest(path):
    with open(path, "rb") as f:
        return _digest_file(f)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class S3Store:
    """S3 via boto3; AWS_ENDPOINT_URL(_S3) in the job's environment points it elsewhere."""

    def __init__(self, uri, bucket, prefix):
        import boto3
        from botocore.config import Config

        self.uri, self.bucket, self.prefix = uri, bucket, prefix
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # a bucket out of reach is told in seconds, not after minutes of retries
        config = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3})
        self.client = boto3.client("s3", endpoint_url=endpoint or None, config=config)

    def _key(self, name):
        return f"{self.prefix}/{name}" if self.prefix else name

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

    def _name(self, name):
        return urllib.parse.quote(f"{self.prefix}/{name}" if self.prefix else name, safe="")

    def _object(self, name, media=False):
        url = f"{self.base}/storage/v1/b/{self.bucket}/o/{self._name(name)}"
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

    def get_bytes(self, name):
        buf = io.BytesIO()
        return buf.getvalue() if self.get(name, buf) else None

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
        url = f"{self.base}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name="
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with self._open("POST", url + self._name(name), body=f, headers=headers):
            pass

    def put_bytes(self, name, data):
        self.put(name, io.BytesIO(data), len(data))

    def delete(self, name):
        try:
            with self._open("DELETE", self._object(name)):
                pass
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise


def upload_loop(up, ended):
    """Poll until `ended` is set (the job's end), then make the last pass."""
    while not ended.wait(POLL_S):
        up.poll()
    up.final()


def main(argv):
    if argv not in (["restore"], ["upload"]):
        sys.exit(f"checkpoints: unknown command {argv!r}")
    uri, ckpt_dir = os.environ["MLCLOUD_CHECKPOINT_URI"], os.environ["MLCLOUD_CHECKPOINT_DIR"]
    if argv == ["restore"]:
        store = open_store(uri, say)
        if store is not None:
            restore(store, ckpt_dir, say)
        return
    store = open_store(uri, lambda line: None)  # restore, run first, said why not
    # its end is the job's end (stdin closing), not a signal that stops the job: the job's
    # last checkpoint, written as it stops, must still go up; kill's SIGKILL bounds it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    ended = threading.Event()

    def watch_stdin():
        while sys.stdin.buffer.read(1 << 12):
            pass
        ended.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    if store is None:
        ended.wait()
        return
    os.nice(10)  # hashing a large checkpoint must not slow the job's own processes
    rank = int(os.environ.get("MLCLOUD_NODE_RANK") or 0)
    upload_loop(Uploader(store, ckpt_dir, rank, say), ended)


if __name__ == "__main__":
    main(sys.argv[1:])
