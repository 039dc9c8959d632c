"""Cloud Storage JSON API v1 on the fake's address: buckets, objects, bucket IAM.

What is served (Google's request and response shapes, from the JSON API reference):

    POST   /storage/v1/b?project=P                         buckets.insert {name}
    GET    /storage/v1/b/B                                 buckets.get
    GET    /storage/v1/b/B/iam?optionsRequestedPolicyVersion=3     buckets.getIamPolicy
    PUT    /storage/v1/b/B/iam                             buckets.setIamPolicy (etag checked)
    POST   /upload/storage/v1/b/B/o?uploadType=media&name=N        objects.insert, media
    POST   /upload/storage/v1/b/B/o?uploadType=multipart   multipart/related: JSON, then bytes
    GET    /storage/v1/b/B/o/N                             objects.get (metadata)
    GET    /storage/v1/b/B/o/N?alt=media                   the bytes (also under /download/)
    GET    /storage/v1/b/B/o?prefix=&delimiter=&maxResults=&pageToken=   objects.list
    DELETE /storage/v1/b/B/o/N                             objects.delete

Object names travel percent-encoded in the path (`a%2Fb`). ifGenerationMatch (0: only if
absent) and ifGenerationNotMatch answer 412 conditionNotMet as GCS does. Downloads carry
`x-goog-hash: crc32c=..,md5=..` so Google's clients verify them.

Who may do what: a request without credentials acts as an emulator's client does (full
access: STORAGE_EMULATOR_HOST, the convention Google's clients follow); the user's key
(`write_credentials`) owns every bucket; any other service account (one made through the
fake's IAM API, whose token `token_for` hands out as a VM's metadata server would) gets only
what the bucket's IAM policy grants it, conditions included. The conditions evaluated are the
forms Google documents for prefix grants, joined by `||`:
`resource.name.startsWith("projects/_/buckets/B/objects/PREFIX")` and
`api.getAttribute("storage.googleapis.com/objectListPrefix", "").startsWith("PREFIX")`;
any other expression is refused at setIamPolicy (400), so a test never passes on a condition
the fake did not read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
import time
import urllib.parse
from datetime import datetime, timezone

from .gce_model import ApiError

API = "https://www.googleapis.com/storage/v1"
BUCKET_RE = re.compile(r"[a-z0-9][-a-z0-9_.]{1,61}[a-z0-9]")
# role -> the object permissions it carries (the predefined roles, object side only)
ROLES = {
    "roles/storage.objectViewer": {"storage.objects.get", "storage.objects.list"},
    "roles/storage.objectCreator": {"storage.objects.create"},
    "roles/storage.objectUser": {
        "storage.objects.get",
        "storage.objects.list",
        "storage.objects.create",
        "storage.objects.delete",
        "storage.objects.update",
    },
    "roles/storage.objectAdmin": {
        "storage.objects.get",
        "storage.objects.list",
        "storage.objects.create",
        "storage.objects.delete",
        "storage.objects.update",
    },
    "roles/storage.admin": {
        "storage.objects.get",
        "storage.objects.list",
        "storage.objects.create",
        "storage.objects.delete",
        "storage.objects.update",
        "storage.buckets.getIamPolicy",
        "storage.buckets.setIamPolicy",
    },
}
_NAME_PREFIX = re.compile(r'resource\.name\.startsWith\(\s*"([^"]*)"\s*\)')
_LIST_PREFIX = re.compile(
    r'api\.getAttribute\(\s*"storage\.googleapis\.com/objectListPrefix"\s*,\s*""\s*\)'
    r'\.startsWith\(\s*"([^"]*)"\s*\)'
)

_CRC_TABLE: list[int] = []


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as GCS reports it; table-driven, fine for test-sized objects."""
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _conditions(expression: str) -> list[tuple[str, str]]:
    """A condition as [(kind, prefix)] alternatives; ApiError(400) for any other form."""
    alts = []
    for part in expression.split("||"):
        part = part.strip()
        if part.startswith("(") and part.endswith(")"):
            part = part[1:-1].strip()
        m = _NAME_PREFIX.fullmatch(part)
        if m:
            alts.append(("name", m.group(1)))
            continue
        m = _LIST_PREFIX.fullmatch(part)
        if m:
            alts.append(("list", m.group(1)))
            continue
        raise ApiError(
            400, "invalid", f"fake GCS cannot evaluate this IAM condition expression: {part!r}"
        )
    return alts


def _check_policy(policy: dict) -> None:
    """What buckets.setIamPolicy refuses: conditions need version 3, known roles, members."""
    for b in policy.get("bindings") or []:
        if not str(b.get("role", "")).startswith("roles/"):
            raise ApiError(400, "invalid", f"Role {b.get('role')!r} is not a valid role.")
        for m in b.get("members") or []:
            if ":" not in m and m not in ("allUsers", "allAuthenticatedUsers"):
                raise ApiError(400, "invalid", f"Invalid argument: member {m!r}")
        cond = b.get("condition")
        if cond is not None:
            if policy.get("version") != 3:
                raise ApiError(
                    400,
                    "invalid",
                    "IAM policy with conditions requires the policy version to be 3.",
                )
            if not cond.get("title") or not cond.get("expression"):
                raise ApiError(400, "invalid", "A condition needs a title and an expression.")
            _conditions(cond["expression"])


class Storage:
    """Buckets and their objects in memory, with bucket IAM policies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, dict] = {}  # name -> bucket resource
        self._objects: dict[tuple[str, str], tuple[dict, bytes]] = {}  # (bucket, name)
        self._policies: dict[str, dict] = {}  # bucket -> policy (etag, version, bindings)
        self._gen = int(time.time() * 1e6)

    # -- the Python API -----------------------------------------------------------------
    def create_bucket(self, name: str, project: str = "mlcloud-test") -> dict:
        if not BUCKET_RE.fullmatch(name):
            raise ApiError(400, "invalid", f"Invalid bucket name: '{name}'")
        with self._lock:
            if name in self._buckets:
                raise ApiError(
                    409,
                    "conflict",
                    "Your previous request to create the named bucket succeeded and you "
                    "already own it.",
                )
            now = _rfc3339(time.time())
            self._buckets[name] = {
                "kind": "storage#bucket",
                "id": name,
                "selfLink": f"{API}/b/{name}",
                "projectNumber": str(abs(hash(project)) % 10**12),
                "name": name,
                "timeCreated": now,
                "updated": now,
                "metageneration": "1",
                "iamConfiguration": {
                    "bucketPolicyOnly": {"enabled": True},
                    "uniformBucketLevelAccess": {"enabled": True},
                    "publicAccessPrevention": "enforced",
                },
                "location": "US",
                "storageClass": "STANDARD",
                "etag": "CAE=",
            }
            self._policies[name] = {
                "version": 1,
                "etag": _b64(secrets.token_bytes(6)),
                "bindings": [
                    {
                        "role": "roles/storage.legacyBucketOwner",
                        "members": [f"projectOwner:{project}"],
                    }
                ],
            }
            return dict(self._buckets[name])

    def objects(self, bucket: str | None = None) -> dict[str, int]:
        """Every object as 'bucket/name' -> size (what a test looks at)."""
        with self._lock:
            return {
                f"{b}/{n}": len(data)
                for (b, n), (_, data) in sorted(self._objects.items())
                if bucket in (None, b)
            }

    def object_bytes(self, bucket: str, name: str) -> bytes:
        with self._lock:
            return self._object(bucket, name)[1]

    def put_object(self, bucket: str, name: str, data: bytes | str) -> dict:
        """Write an object directly (a test's setup), as an upload would."""
        if isinstance(data, str):
            data = data.encode()
        return self._insert(bucket, name, data, {}, "application/octet-stream", {})

    def bucket_policy(self, bucket: str) -> dict:
        with self._lock:
            self._bucket(bucket)
            return json.loads(json.dumps(self._policies[bucket]))

    def has(self, bucket: str, name: str) -> bool:
        with self._lock:
            return (bucket, name) in self._objects

    # -- the API ------------------------------------------------------------------------
    def get_bucket(self, name: str) -> dict:
        with self._lock:
            return dict(self._bucket(name))

    @staticmethod
    def upload_name(query: dict, ctype: str, raw: bytes) -> str:
        """The object name an upload names (the query's, or the multipart metadata's)."""
        if query.get("uploadType") == "multipart":
            return _multipart(ctype, raw)[0].get("name") or query.get("name", "")
        return query.get("name", "")

    def _bucket(self, name: str) -> dict:
        if name not in self._buckets:
            raise ApiError(404, "notFound", "The specified bucket does not exist.")
        return self._buckets[name]

    def _object(self, bucket: str, name: str) -> tuple[dict, bytes]:
        self._bucket(bucket)
        if (bucket, name) not in self._objects:
            raise ApiError(404, "notFound", f"No such object: {bucket}/{name}")
        return self._objects[(bucket, name)]

    def _preconditions(self, bucket: str, name: str, query: dict) -> None:
        current = self._objects.get((bucket, name))
        gen = int(current[0]["generation"]) if current else 0
        for key, ok in (
            ("ifGenerationMatch", lambda want: gen == want),
            ("ifGenerationNotMatch", lambda want: gen != want),
        ):
            if key in query:
                try:
                    want = int(query[key])
                except ValueError:
                    raise ApiError(400, "invalid", f"Invalid argument for {key}") from None
                if not ok(want):
                    raise ApiError(
                        412,
                        "conditionNotMet",
                        "At least one of the pre-conditions you specified did not hold.",
                        location=f"If-{'None-' if 'Not' in key else ''}Match",
                        locationType="header",
                    )

    def _insert(
        self, bucket: str, name: str, data: bytes, meta: dict, ctype: str, query: dict
    ) -> dict:
        if not name or len(name.encode()) > 1024 or "\r" in name or "\n" in name:
            raise ApiError(400, "invalid", "The specified object name is not valid.")
        with self._lock:
            self._bucket(bucket)
            self._preconditions(bucket, name, query)
            self._gen += 1
            now = _rfc3339(time.time())
            gen = str(self._gen)
            quoted = urllib.parse.quote(name, safe="")
            res = {
                "kind": "storage#object",
                "id": f"{bucket}/{name}/{gen}",
                "selfLink": f"{API}/b/{bucket}/o/{quoted}",
                "mediaLink": (
                    f"https://storage.googleapis.com/download/storage/v1/b/{bucket}/o/"
                    f"{quoted}?generation={gen}&alt=media"
                ),
                "name": name,
                "bucket": bucket,
                "generation": gen,
                "metageneration": "1",
                "contentType": meta.get("contentType") or ctype or "application/octet-stream",
                "storageClass": "STANDARD",
                "size": str(len(data)),
                "md5Hash": _b64(hashlib.md5(data).digest()),  # noqa: S324 - GCS's own hash
                "crc32c": _b64(crc32c(data).to_bytes(4, "big")),
                "etag": _b64(gen.encode())[:12],
                "timeCreated": now,
                "updated": now,
                "timeStorageClassUpdated": now,
            }
            if meta.get("metadata"):
                res["metadata"] = {str(k): str(v) for k, v in meta["metadata"].items()}
            self._objects[(bucket, name)] = (res, data)
            return dict(res)

    def upload(self, bucket: str, query: dict, ctype: str, raw: bytes) -> dict:
        kind = query.get("uploadType")
        if kind == "media":
            if not query.get("name"):
                raise ApiError(400, "required", "Required parameter: name")
            return self._insert(bucket, query["name"], raw, {}, ctype, query)
        if kind == "multipart":
            meta, data, data_type = _multipart(ctype, raw)
            name = meta.get("name") or query.get("name")
            if not name:
                raise ApiError(400, "required", "Required parameter: name")
            return self._insert(bucket, name, data, meta, data_type, query)
        raise ApiError(
            400, "invalid", f"fake GCS serves uploadType media and multipart, not {kind!r}"
        )

    def get(self, bucket: str, name: str, query: dict) -> tuple[dict, bytes]:
        with self._lock:
            res, data = self._object(bucket, name)
            if "generation" in query and query["generation"] != res["generation"]:
                raise ApiError(404, "notFound", f"No such object: {bucket}/{name}")
            self._preconditions(bucket, name, query)
            return dict(res), data

    def delete(self, bucket: str, name: str, query: dict) -> None:
        with self._lock:
            self._object(bucket, name)
            self._preconditions(bucket, name, query)
            del self._objects[(bucket, name)]

    def list(self, bucket: str, query: dict) -> dict:
        prefix = query.get("prefix", "")
        delim = query.get("delimiter", "")
        try:
            limit = min(int(query.get("maxResults", 1000)), 1000)
        except ValueError:
            raise ApiError(400, "invalid", "Invalid argument for maxResults") from None
        token = query.get("pageToken", "")
        start = base64.urlsafe_b64decode(token.encode()).decode() if token else ""
        with self._lock:
            self._bucket(bucket)
            names = sorted(n for (b, n) in self._objects if b == bucket and n.startswith(prefix))
            items, prefixes, last = [], [], None
            for n in names:
                if start and n <= start:
                    continue
                if len(items) + len(prefixes) >= limit:
                    break
                last = n
                rest = n[len(prefix) :]
                if delim and delim in rest:
                    p = prefix + rest[: rest.index(delim) + len(delim)]
                    if p not in prefixes:
                        prefixes.append(p)
                    continue
                items.append(dict(self._objects[(bucket, n)][0]))
            out: dict = {"kind": "storage#objects"}
            if items:
                out["items"] = items
            if prefixes:
                out["prefixes"] = prefixes
            if last is not None and any(n > last for n in names):
                out["nextPageToken"] = base64.urlsafe_b64encode(last.encode()).decode()
            return out

    def get_policy(self, bucket: str, query: dict) -> dict:
        with self._lock:
            self._bucket(bucket)
            pol = json.loads(json.dumps(self._policies[bucket]))
        asked = int(query.get("optionsRequestedPolicyVersion") or 1)
        if asked < 3 and any("condition" in b for b in pol.get("bindings", [])):
            raise ApiError(
                400,
                "invalid",
                "The policy has conditions: request it with optionsRequestedPolicyVersion=3.",
            )
        pol["kind"] = "storage#policy"
        pol["resourceId"] = f"projects/_/buckets/{bucket}"
        return pol

    def set_policy(self, bucket: str, body: dict) -> dict:
        _check_policy(body)
        with self._lock:
            self._bucket(bucket)
            current = self._policies[bucket]
            if body.get("etag") and body["etag"] != current["etag"]:
                raise ApiError(
                    412,
                    "conditionNotMet",
                    "At least one of the pre-conditions you specified did not hold.",
                )
            self._policies[bucket] = {
                "version": int(body.get("version") or 1),
                "etag": _b64(secrets.token_bytes(6)),
                "bindings": [b for b in body.get("bindings") or [] if b.get("members")],
            }
        return self.get_policy(bucket, {"optionsRequestedPolicyVersion": "3"})

    def forget_member(self, member: str, uid: str) -> None:
        """A deleted account's grants stay, renamed as GCP shows them (deleted:...?uid=)."""
        with self._lock:
            for pol in self._policies.values():
                for b in pol.get("bindings", []):
                    b["members"] = [
                        f"deleted:{m}?uid={uid}" if m == member else m for m in b["members"]
                    ]

    # -- permissions ----------------------------------------------------------------------
    def allowed(self, member: str, permission: str, bucket: str, name: str | None, query) -> bool:
        """Whether the bucket's policy grants `permission` on the object `name` (None: the
        bucket itself, as objects.list asks) to `member`."""
        with self._lock:
            self._bucket(bucket)
            bindings = list(self._policies[bucket].get("bindings", []))
        resource = f"projects/_/buckets/{bucket}" + (f"/objects/{name}" if name else "")
        list_prefix = query.get("prefix", "") if name is None else ""
        for b in bindings:
            if member not in b.get("members", []) or permission not in ROLES.get(b["role"], ()):
                continue
            cond = b.get("condition")
            if cond is None:
                return True
            for kind, prefix in _conditions(cond["expression"]):
                if kind == "name" and resource.startswith(prefix):
                    return True
                if kind == "list" and name is None and list_prefix.startswith(prefix):
                    return True
        return False


def _multipart(ctype: str, raw: bytes) -> tuple[dict, bytes, str]:
    """The metadata, the bytes and their content type of a multipart/related upload."""
    m = re.search(r'boundary="?([^";]+)"?', ctype or "")
    if not ctype.startswith("multipart/related") or not m:
        raise ApiError(400, "invalid", "Multipart upload needs Content-Type multipart/related.")
    sep = b"--" + m.group(1).encode()
    parts = raw.split(sep)
    # ['', part1, part2, '--...']: each part is CRLF headers CRLF CRLF body CRLF
    if len(parts) < 4 or not parts[-1].startswith(b"--"):
        raise ApiError(400, "invalid", "Malformed multipart body.")
    bodies = []
    for part in parts[1:3]:
        head, _, body = part.partition(b"\r\n\r\n")
        if body.endswith(b"\r\n"):
            body = body[:-2]
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (h.partition(":") for h in head.decode().split("\r\n") if h.strip())
        )
        bodies.append((headers.get("content-type", ""), body))
    try:
        meta = json.loads(bodies[0][1] or b"{}")
    except ValueError:
        raise ApiError(400, "parseError", "Invalid JSON payload received.") from None
    return meta, bodies[1][1], bodies[1][0]
