"""A fake Compute Engine API v1 on loopback, for the real google-cloud-compute client.

Usage (for provider tests; fixtures in tests/gce_fixtures.py, registered by conftest):

    def test_up(gce_env):                      # in-process fake + credentials + environment
        fake = gce_env.fake                    # GceFake: the API below, plus .url
        # GOOGLE_APPLICATION_CREDENTIALS (a fresh service-account key whose token_uri is the
        # fake's /token), GOOGLE_CLOUD_PROJECT and MLCLOUD_GCE_API_ENDPOINT are set, so
        #   creds, project = google.auth.default()
        #   opts = ClientOptions(api_endpoint=os.environ["MLCLOUD_GCE_API_ENDPOINT"])
        #   compute_v1.InstancesClient(credentials=creds, client_options=opts)
        # talk to the fake. Wait on operations with ZoneOperationsClient /
        # GlobalOperationsClient built from the same options (`.wait(...)`), never
        # `insert(...).result()`: that polls compute.googleapis.com.
        fake.exhaust("us-central1-a")          # inserts there end DONE with
                                               # ZONE_RESOURCE_POOL_EXHAUSTED, no VM left
        fake.set_capacity("us-central1-b", 3)  # 3 more VMs fit there (bulkInsert: minCount)
        fake.quota("us-central1", limit=0)     # QUOTA_EXCEEDED in the operation (sync=True: 403)
        fake.rate_limit(2, method="POST")      # the next 2 POSTs answer 429 rateLimitExceeded
        fake.fail_calls(1, 403, "forbidden")   # any status/reason (503 backendError default)
        fake.revoke_credentials()              # every key and token so far: 401 from now on
        fake.slow(5)                           # operations from now on take 5 s
        fake.advance_clock(3600)               # what falls due within an hour happens now
                                               # (e.g. maxRunDuration deletes its VMs)
        fake.unsupported("us-central1-a", "nvidia-tesla-t4")  # no such type in the zone:
                                               # 404 for accelerators, 400 for machine types
        fake.preempt("us-central1-a", "vm-1")  # Spot reclaim (DELETE or STOP per the VM)
        fake.reclaim_while_starting("us-central1-a")  # the next VM placed there ends while
                                               # STAGING, its insert already DONE
        fake.rate_limit_operations(2)          # the next 2 inserts are accepted, then their
                                               # operation ends RATE_LIMIT_EXCEEDED
        fake.instances(), fake.firewalls(), fake.is_empty()
        fake.calls("POST", r"/instances$")     # the request log: method, path, query, body
        [c.request_id for c in fake.calls("POST")]

    For the CLI as a subprocess, `gce_fake_process` runs
    `python -m tests.fakes.gce_server --port-file F --credentials-file C --project P`
    (stopped by PID) and yields a RemoteFake with the same methods over `/_fake/<method>`.

Served: instances insert (requestId: a repeat returns the same operation, no second VM),
bulkInsert (count, minCount, namePattern ####, instanceProperties, perInstanceProperties),
get, list (filter, maxResults, pageToken), delete, stop, start, aggregatedList; zone and global
operations get and wait; firewalls insert/get/list/patch/delete; images get and getFromFamily
(deeplearning-platform-release: pytorch-latest-gpu, ...); zones and regions get/list (the
catalog's GCP zones and common ones). Instances go PROVISIONING -> STAGING -> RUNNING over
`op_seconds`, get natIPs from 203.0.113.0/24 (documentation ranges; tests reach nodes through
a proxy command, never these) and networkIPs from 10.128.0.0/9. Errors come in Google's JSON
error format (404 notFound, 409 alreadyExists, 400 invalid, 401, 403, 429).

The same address also serves Cloud Storage's JSON API (objects: media and multipart upload,
get and alt=media, list by prefix, delete; buckets and their IAM policies, prefix conditions
enforced; see gce_storage.py), reachable as STORAGE_EMULATOR_HOST=<url>, and the IAM API's
service accounts (create/get/list/delete; gce_iam.py):

        fake.create_bucket("ckpts"); fake.put_object("ckpts", "run/x", "bytes")
        fake.objects("ckpts")                  # {"ckpts/run/x": 5}
        fake.bucket_policy("ckpts"), fake.service_accounts()
        fake.iam_lag(2)                        # new accounts unknown to bucket IAM for 2 s
        fake.token_for(email)                  # a token as a VM running as `email` gets from
                                               # its metadata server (grants enforced)

The same address also serves the Cloud Billing Catalog API's Compute Engine SKUs
(`GET /v1/services/6F81-5844-456A/skus`, paged): core, RAM and GPU prices per region, made
from the shipped catalog (see gce_billing.py), for `catalog refresh --provider gce` and live
offers; `fake.set_price("us-central1", "Nvidia Tesla T4 GPU", 0.9, usage="Preemptible")` changes
the unit price of the SKUs of that part there (a price spike).

GCE behaviours the fake keeps, worth knowing when writing the provider: an insert's call
succeeds and its operation fails (capacity, quota); a repeated requestId returns the first
operation, failed or not (GCE keeps them for at least 60 min), so a retry after a failure
needs a new id; `list` without `maxResults` pages at 500; an ingress firewall rule with no
sources is open to 0.0.0.0/0; deleting an instance shows STOPPING until the operation ends; a
type the zone does not offer fails the call (machine type: 400 "... does not exist in zone";
GPU: "The resource '.../acceleratorTypes/K' was not found"); a 401 raises api_core's
Unauthorized (the REST transport never raises its subclass Unauthenticated).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import threading
import traceback
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .gce_auth import Authority
from .gce_billing import compute_skus, page_of_skus
from .gce_compute import Compute
from .gce_iam import Iam
from .gce_model import ApiError
from .gce_state import Call
from .gce_storage import Storage

DEFAULT_PROJECT = "mlcloud-test"
# the Python API reachable over /_fake/<name> (for a fake in another process)
CONTROL = (
    "exhaust",
    "set_capacity",
    "unsupported",
    "quota",
    "rate_limit",
    "fail_calls",
    "rate_limit_operations",
    "reclaim_while_starting",
    "revoke_credentials",
    "slow",
    "advance_clock",
    "preempt",
    "set_price",
    "add_image",
    "reset",
    "instances",
    "firewalls",
    "is_empty",
    "calls",
    "clear_calls",
    "write_credentials",
    "create_bucket",
    "put_object",
    "objects",
    "bucket_policy",
    "service_accounts",
    "token_for",
    "iam_lag",
)

_P = r"/compute/v1/projects/(?P<project>[^/]+)"
_ROUTES = [
    ("GET", _P + r"/zones/(?P<zone>[^/]+)/instances", "list_instances"),
    ("POST", _P + r"/zones/(?P<zone>[^/]+)/instances", "insert_instance"),
    ("POST", _P + r"/zones/(?P<zone>[^/]+)/instances/bulkInsert", "bulk_insert"),
    ("GET", _P + r"/zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)", "get_instance"),
    ("DELETE", _P + r"/zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)", "delete_instance"),
    ("POST", _P + r"/zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)/stop", "stop_instance"),
    ("POST", _P + r"/zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)/start", "start_instance"),
    ("GET", _P + r"/aggregated/instances", "aggregated_instances"),
    ("GET", _P + r"/zones/(?P<zone>[^/]+)/operations/(?P<op>[^/]+)", "zone_op"),
    ("POST", _P + r"/zones/(?P<zone>[^/]+)/operations/(?P<op>[^/]+)/wait", "zone_op_wait"),
    ("GET", _P + r"/global/operations/(?P<op>[^/]+)", "global_op"),
    ("POST", _P + r"/global/operations/(?P<op>[^/]+)/wait", "global_op_wait"),
    ("GET", _P + r"/global/firewalls", "list_firewalls"),
    ("POST", _P + r"/global/firewalls", "insert_firewall"),
    ("GET", _P + r"/global/firewalls/(?P<name>[^/]+)", "get_firewall"),
    ("DELETE", _P + r"/global/firewalls/(?P<name>[^/]+)", "delete_firewall"),
    ("PATCH", _P + r"/global/firewalls/(?P<name>[^/]+)", "patch_firewall"),
    ("GET", _P + r"/global/images/family/(?P<family>[^/]+)", "image_from_family"),
    ("GET", _P + r"/global/images/(?P<name>[^/]+)", "get_image"),
    ("GET", _P + r"/zones", "list_zones"),
    ("GET", _P + r"/zones/(?P<zone>[^/]+)", "get_zone"),
    ("GET", _P + r"/regions", "list_regions"),
    ("GET", _P + r"/regions/(?P<region>[^/]+)", "get_region"),
]
_ROUTES = [(m, re.compile(p + "$"), h) for m, p, h in _ROUTES]
# the Cloud Billing Catalog API (prices), served at the same address
_BILLING = re.compile(r"/v1/services/([^/]+)/skus")
# the IAM API's service accounts (gce_iam.py)
_IAM = re.compile(r"/v1/projects/(?P<project>[^/]+)/serviceAccounts(?:/(?P<ref>[^/:]+))?")
# the Cloud Storage JSON API (gce_storage.py): bucket, then object (percent-encoded) or iam
_GCS_PREFIXES = ("/storage/v1/", "/upload/storage/v1/", "/download/storage/v1/")
_GCS_BUCKETS = re.compile(r"/storage/v1/b")
_GCS_BUCKET = re.compile(r"/storage/v1/b/(?P<bucket>[^/]+)(?P<iam>/iam)?")
_GCS_OBJECTS = re.compile(r"/(?:upload/)?storage/v1/b/(?P<bucket>[^/]+)/o")
_GCS_OBJECT = re.compile(r"/(?:download/)?storage/v1/b/(?P<bucket>[^/]+)/o/(?P<name>[^/]+)")


class GceFake(Compute):
    """The fake Compute API served over HTTP on 127.0.0.1 (port 0: a free one)."""

    def __init__(
        self,
        port: int = 0,
        op_seconds: float = 0.2,
        require_auth: bool = True,
        wait_cap: float = 120.0,
    ):
        super().__init__(op_seconds=op_seconds, wait_cap=wait_cap)
        self.require_auth = require_auth
        self.authority = Authority()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        self._skus: list[dict] | None = None
        self.storage = Storage()
        self.iam = Iam()

    def reset(self) -> None:
        super().reset()
        self.storage = Storage()
        self.iam = Iam()
        self._skus = None  # prices as made from the catalog again

    # -- VMs run as a service account that exists (GCE refuses the insert otherwise) ------
    def _check_accounts(self, accounts: list | None, field: str) -> None:
        for i, sa in enumerate(accounts or []):
            address = sa.get("email", "")
            default = address == "default" or address.endswith(
                "-compute@developer.gserviceaccount.com"
            )
            if not default and not self.iam.exists(address):
                raise ApiError(
                    400,
                    "invalid",
                    f"Invalid value for field '{field}.serviceAccounts[{i}].email': "
                    f"'{address}'. The service account does not exist.",
                )
            if not sa.get("scopes"):
                raise ApiError(
                    400,
                    "invalid",
                    f"Invalid value for field '{field}.serviceAccounts[{i}].scopes': ''. "
                    "A service account needs at least one scope.",
                )

    def insert_instance(self, project, zone, body, rid, caller):
        self._check_accounts(body.get("serviceAccounts"), "resource")
        return super().insert_instance(project, zone, body, rid, caller)

    def bulk_insert(self, project, zone, body, rid, caller):
        props = body.get("instanceProperties") or {}
        self._check_accounts(props.get("serviceAccounts"), "resource.instanceProperties")
        return super().bulk_insert(project, zone, body, rid, caller)

    # -- Cloud Storage and IAM: the Python API (see gce_storage.py, gce_iam.py) -------------
    def create_bucket(self, name: str, project: str = DEFAULT_PROJECT) -> dict:
        return self.storage.create_bucket(name, project)

    def put_object(self, bucket: str, name: str, data: str) -> dict:
        """Write an object (text; bytes in-process) as an upload would."""
        return self.storage.put_object(bucket, name, data)

    def objects(self, bucket: str | None = None) -> dict[str, int]:
        """Every object as 'bucket/name' -> size."""
        return self.storage.objects(bucket)

    def bucket_policy(self, bucket: str) -> dict:
        return self.storage.bucket_policy(bucket)

    def service_accounts(self, project: str | None = None) -> list[dict]:
        return self.iam.service_accounts(project)

    def is_empty(self) -> bool:
        """No instance, firewall rule or service account left (what `down` must achieve)."""
        return super().is_empty() and not self.iam.service_accounts()

    def iam_lag(self, seconds: float) -> None:
        """A new service account is unknown to bucket IAM for `seconds` (400 "does not
        exist" from setIamPolicy), as IAM's eventual consistency has it."""
        self.iam.lag = seconds

    def token_for(self, email: str) -> str:
        """An access token for a service account the fake's IAM made: what a VM running as
        it gets from its metadata server."""
        if not self.iam.exists(email):
            raise ApiError(404, "notFound", f"no service account {email}")
        return self.authority.issue(email)

    def revoke_credentials(self) -> None:
        """Every key file and token issued so far is refused from now on (401)."""
        self.authority.revoke()

    def write_credentials(self, path: str, project: str = DEFAULT_PROJECT) -> str:
        """A service-account key file this fake trusts (token_uri: its /token); the email."""
        return self.authority.write_key_file(path, project, f"{self.url}/token")

    def set_price(self, region: str, part: str, usd: float, usage: str = "OnDemand") -> int:
        """The Billing Catalog's unit price of every SKU in region whose description has part
        ("N1 Predefined Instance Core", "Nvidia Tesla T4 GPU") and of that usage type
        (OnDemand, Preemptible: Spot) becomes usd; how many SKUs changed (none: ValueError)."""
        from .gce_billing import set_unit_price

        if self._skus is None:
            self._skus = compute_skus()
        changed = set_unit_price(self._skus, region, part, usd, usage)
        if not changed:
            raise ValueError(f"no {usage} SKU of {part!r} in {region}")
        return changed

    def start(self) -> GceFake:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="gce-fake", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> GceFake:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- dispatch -----------------------------------------------------------------------
    def handle_iam(self, method: str, path: str, query: dict, body: dict | None) -> dict | None:
        """The IAM API's service accounts, or None when `path` is not one of its."""
        m = _IAM.fullmatch(path)
        if not m:
            return None
        project, ref = m.group("project"), m.group("ref")
        ref = urllib.parse.unquote(ref) if ref else None
        if ref is None and method == "POST":
            return self.iam.create(project, body or {})
        if ref is None and method == "GET":
            return self.iam.list(project, query)
        if ref is not None and method == "GET":
            return self.iam.get(project, ref)
        if ref is not None and method == "DELETE":
            account = self.iam.get(project, ref)
            self.iam.delete(project, ref)
            self.storage.forget_member(f"serviceAccount:{account['email']}", account["uniqueId"])
            return {}
        raise ApiError(404, "notFound", f"The requested URL {method} {path} was not found.")

    def handle_storage(
        self, method: str, path: str, query: dict, headers, raw: bytes, caller: str | None
    ) -> tuple[dict | None, bytes | None]:
        """A Cloud Storage JSON API call: (JSON reply, None) or (object resource, its bytes)
        for alt=media. `caller` None: no credentials (the emulator convention, full access)."""
        st = self.storage

        def need(permission: str, bucket: str, name: str | None = None) -> None:
            if caller is None or caller in self.authority.owners():
                return
            if not st.allowed(f"serviceAccount:{caller}", permission, bucket, name, query):
                what = "object" if name else "bucket"
                raise ApiError(
                    403,
                    "forbidden",
                    f"{caller} does not have {permission} access to the Google Cloud Storage "
                    f"{what}. Permission '{permission}' denied on resource (or it may not "
                    "exist).",
                )

        if method == "POST" and _GCS_BUCKETS.fullmatch(path):
            need("storage.buckets.create", "")
            body = json.loads(raw or b"{}")
            return st.create_bucket(body.get("name", ""), query.get("project", "")), None
        m = _GCS_OBJECT.fullmatch(path)
        if m:
            bucket, name = m.group("bucket"), urllib.parse.unquote(m.group("name"))
            if method == "GET":
                need("storage.objects.get", bucket, name)
                res, data = st.get(bucket, name, query)
                media = query.get("alt") == "media" or path.startswith("/download/")
                return res, (data if media else None)
            if method == "DELETE":
                need("storage.objects.delete", bucket, name)
                st.delete(bucket, name, query)
                return None, b""
        m = _GCS_OBJECTS.fullmatch(path)
        if m:
            bucket = m.group("bucket")
            if method == "POST" and path.startswith("/upload/"):
                ctype = headers.get("Content-Type", "")
                name = st.upload_name(query, ctype, raw)
                need("storage.objects.create", bucket, name)
                if st.has(bucket, name):
                    need("storage.objects.delete", bucket, name)  # an overwrite deletes
                return st.upload(bucket, query, ctype, raw), None
            if method == "GET":
                need("storage.objects.list", bucket)
                return st.list(bucket, query), None
        m = _GCS_BUCKET.fullmatch(path)
        if m:
            bucket = m.group("bucket")
            if m.group("iam") and method == "GET":
                need("storage.buckets.getIamPolicy", bucket)
                return st.get_policy(bucket, query), None
            if m.group("iam") and method == "PUT":
                need("storage.buckets.setIamPolicy", bucket)
                body = json.loads(raw or b"{}")
                for b in body.get("bindings") or []:
                    for member in b.get("members") or []:
                        kind, _, address = member.partition(":")
                        if kind == "serviceAccount" and self.iam.fresh(address):
                            raise ApiError(
                                400, "invalid", f"Service account {address} does not exist."
                            )
                return st.set_policy(bucket, body), None
            if method == "GET" and not m.group("iam"):
                need("storage.buckets.get", bucket)
                return st.get_bucket(bucket), None
        raise ApiError(404, "notFound", f"The requested URL {method} {path} was not found.")

    def handle(self, method: str, path: str, query: dict, body: dict | None, caller: str) -> dict:
        iam = self.handle_iam(method, path, query, body)
        if iam is not None:
            return iam
        billing = _BILLING.fullmatch(path) if method == "GET" else None
        if billing:
            if self._skus is None:
                self._skus = compute_skus()
            return page_of_skus(self._skus, billing.group(1), query)
        for m, rx, name in _ROUTES:
            match = rx.fullmatch(path) if m == method else None
            if match:
                return self._route(name, match.groupdict(), query, body, caller)
        raise ApiError(
            404, "notFound", f"The requested URL {method} {path} was not found on this fake."
        )

    def _route(self, name, a, query, body, caller):  # noqa: C901 - a routing table
        rid = query.get("requestId")
        p = a["project"]
        if name == "list_instances":
            return self.list_instances(p, a["zone"], query)
        if name == "insert_instance":
            return self.insert_instance(p, a["zone"], body or {}, rid, caller)
        if name == "bulk_insert":
            return self.bulk_insert(p, a["zone"], body or {}, rid, caller)
        if name == "get_instance":
            return self.get_instance(p, a["zone"], a["name"])
        if name == "delete_instance":
            return self.delete_instance(p, a["zone"], a["name"], rid, caller)
        if name == "stop_instance":
            return self.stop_instance(p, a["zone"], a["name"], rid, caller)
        if name == "start_instance":
            return self.start_instance(p, a["zone"], a["name"], rid, caller)
        if name == "aggregated_instances":
            return self.aggregated_instances(p, query)
        if name in ("zone_op", "zone_op_wait"):
            self._known_zone(p, a["zone"])
            return self.get_operation(p, f"zones/{a['zone']}", a["op"], wait=name.endswith("wait"))
        if name in ("global_op", "global_op_wait"):
            return self.get_operation(p, "global", a["op"], wait=name.endswith("wait"))
        if name == "list_firewalls":
            return self.list_firewalls(p, query)
        if name == "insert_firewall":
            return self.insert_firewall(p, body or {}, rid, caller)
        if name == "get_firewall":
            return self.get_firewall(p, a["name"])
        if name == "delete_firewall":
            return self.delete_firewall(p, a["name"], rid, caller)
        if name == "patch_firewall":
            return self.patch_firewall(p, a["name"], body or {}, rid, caller)
        if name == "image_from_family":
            return self.image_from_family(p, a["family"])
        if name == "get_image":
            return self.get_image(p, a["name"])
        if name == "list_zones":
            return self.list_zones(p, query)
        if name == "get_zone":
            return self.get_zone(p, a["zone"])
        if name == "list_regions":
            return self.list_regions(p, query)
        return self.get_region(p, a["region"])

    def control(self, name: str, payload: dict):
        """/_fake/<name>: the Python API for a fake in another process (JSON in and out)."""
        if name not in CONTROL:
            raise ApiError(404, "notFound", f"no control method {name}")
        result = getattr(self, name)(*payload.get("args", []), **payload.get("kwargs", {}))
        if name == "calls":
            return [c.__dict__ for c in result]
        return result


def _handler_for(fake: GceFake):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # one line per request otherwise
            pass

        def _reply(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if url.path == "/token":
                form = {k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
                self._reply(*fake.authority.grant(form))
                return
            if url.path.startswith(_GCS_PREFIXES):
                self._storage(method, url.path, query, raw)
                return
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                self._reply(
                    400, ApiError(400, "parseError", "Invalid JSON payload received.").body()
                )
                return
            if url.path.startswith("/_fake/"):
                try:
                    self._reply(
                        200, {"result": fake.control(url.path[len("/_fake/") :], body or {})}
                    )
                except ApiError as e:
                    self._reply(e.code, e.body())
                return
            call = Call(method, url.path, query, body)
            fake.record(call)
            caller = fake.authority.caller(self.headers.get("Authorization"))
            if fake.require_auth and caller is None:
                err = ApiError(
                    401,
                    "authError",
                    "Request is missing required authentication credential. Expected OAuth 2 "
                    "access token, login cookie or other valid authentication credential.",
                    status="UNAUTHENTICATED",
                    location="Authorization",
                    locationType="header",
                )
                call.status = 401
                self._reply(401, err.body())
                return
            err = fake.injected_failure(method, url.path)
            if err is not None:
                call.status = err.code
                self._reply(err.code, err.body())
                return
            try:
                result = fake.handle(method, url.path, query, body, caller)
            except ApiError as e:
                call.status = e.code
                self._reply(e.code, e.body())
                return
            except Exception as e:  # a body the fake cannot read: say so instead of hanging up
                traceback.print_exc()
                err = ApiError(500, "backendError", f"fake GCE server: {type(e).__name__}: {e}")
                call.status = 500
                self._reply(500, err.body())
                return
            call.status = 200
            self._reply(200, result)

        def _storage(self, method: str, path: str, query: dict, raw: bytes) -> None:
            """Cloud Storage: bytes in and out; credentials optional (emulator convention)."""
            call = Call(method, path, query, None)
            fake.record(call)
            auth = self.headers.get("Authorization")
            caller = fake.authority.caller(auth) if auth else None
            if caller and caller not in fake.authority.owners() and not fake.iam.exists(caller):
                caller = None  # a deleted service account's tokens stop working
            try:
                if auth and caller is None:
                    raise ApiError(401, "required", "Invalid Credentials", status="UNAUTHENTICATED")
                err = fake.injected_failure(method, path)
                if err is not None:
                    raise err
                res, data = fake.handle_storage(method, path, query, self.headers, raw, caller)
            except ApiError as e:
                call.status = e.code
                self._reply(e.code, e.body())
                return
            except Exception as e:
                traceback.print_exc()
                err = ApiError(500, "backendError", f"fake GCS: {type(e).__name__}: {e}")
                call.status = 500
                self._reply(500, err.body())
                return
            if res is None:  # a delete: 204, no body
                call.status = 204
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if data is None:
                call.status = 200
                self._reply(200, res)
                return
            call.status = 200
            self.send_response(200)
            self.send_header("Content-Type", res["contentType"])
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-goog-generation", res["generation"])
            self.send_header("x-goog-hash", f"crc32c={res['crc32c']},md5={res['md5Hash']}")
            self.send_header("x-goog-stored-content-length", res["size"])
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._serve("GET")

        def do_PUT(self):
            self._serve("PUT")

        def do_POST(self):
            self._serve("POST")

        def do_DELETE(self):
            self._serve("DELETE")

        def do_PATCH(self):
            self._serve("PATCH")

    return Handler


class RemoteFake:
    """The GceFake API of a fake running in another process (`python -m tests.fakes.gce_server`)."""

    def __init__(self, url: str, pid: int | None = None):
        self.url, self.pid = url, pid

    def _call(self, name: str, *args, **kwargs):
        req = urllib.request.Request(
            f"{self.url}/_fake/{name}",
            data=json.dumps({"args": args, "kwargs": kwargs}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback
            return json.loads(r.read())["result"]

    def __getattr__(self, name: str):
        if name not in CONTROL:
            raise AttributeError(name)
        if name == "calls":
            return lambda *a, **k: [Call(**c) for c in self._call("calls", *a, **k)]
        return lambda *a, **k: self._call(name, *a, **k)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the port here once listening")
    ap.add_argument("--credentials-file", help="write a service-account key file the fake trusts")
    ap.add_argument("--project", default=DEFAULT_PROJECT)
    ap.add_argument("--op-seconds", type=float, default=0.2)
    args = ap.parse_args(argv)
    fake = GceFake(port=args.port, op_seconds=args.op_seconds)
    if args.credentials_file:
        fake.write_credentials(args.credentials_file, args.project)
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(fake.port))
        os.replace(tmp, args.port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    fake.start()
    while not stop.wait(0.5):
        pass
    fake.stop()


if __name__ == "__main__":
    main()
