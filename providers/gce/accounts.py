"""Least-privilege bucket credentials for a GCE cluster's nodes: one service account per
cluster, granted only the spec's gs:// prefixes (docs/architecture.md, "The job's environment").

The account is made through the IAM API (projects.serviceAccounts.create, delete at `down`);
its grants are bindings in each bucket's IAM policy (policy version 3) with a condition on the
object name prefix: roles/storage.objectAdmin for `checkpoints`, roles/storage.objectViewer for
`data`, each also allowing a listing under the prefix. The VMs run as the account with the
devstorage.read_write scope, and take short-lived tokens from the metadata server: the user's
credentials never reach a node. The account's description names the cluster, its owner and the
buckets it was granted, so `down` and `gc` find the grants again without the spec.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Any

from mlcloud.providers.base import AuthError, ProviderError, StorageAccess

from mlcloud.spec import buckets

IAM_ENDPOINT_ENV = "MLCLOUD_GCE_IAM_ENDPOINT"
IAM_ENDPOINT = "https://iam.googleapis.com"
ACCOUNT_PREFIX = "mlc-"  # every account mlcloud makes: `gc` lists these
READ_WRITE = "roles/storage.objectAdmin"
READ_ONLY = "roles/storage.objectViewer"
DESCRIPTION_MAX = 256  # IAM's limit
POLICY_TRIES = 5  # setIamPolicy answers 412 when another writer's change came first
RETRIES = 4  # a 429 or 5xx is tried this many times in all, backing off
BACKOFF_S = 1.0
# IAM is eventually consistent: a bucket's setIamPolicy may not know a fresh account yet
FRESH_ACCOUNT_WAIT_S = 60.0
FRESH_SLEEP_S = 2.0  # between its tries
_DESCRIPTION = re.compile(r"mlcloud cluster=(\S+) owner=(\S+): buckets=(\S*)$")


def account_id(uid: str) -> str:
    """6-30 characters of [a-z0-9-] starting with a letter: a hash of the cluster's uid."""
    return ACCOUNT_PREFIX + hashlib.sha256(uid.encode()).hexdigest()[:24]


def email(uid: str, project: str) -> str:
    return f"{account_id(uid)}@{project}.iam.gserviceaccount.com"


def gcs(storage: StorageAccess) -> tuple[list[buckets.BucketUri], list[buckets.BucketUri]]:
    """The gs:// locations to grant: (read-write, read-only)."""
    write = [u for u in map(buckets.parse, storage.write) if u.scheme == "gs"]
    read = [u for u in map(buckets.parse, storage.read) if u.scheme == "gs"]
    return write, read


def wanted(storage: StorageAccess) -> bool:
    """Whether the cluster gets an account: only when the spec names gs:// locations."""
    write, read = gcs(storage)
    return bool(write or read)


def description(uid: str, owner: str, names: list[str]) -> str:
    text = f"mlcloud cluster={uid} owner={owner}: buckets={','.join(names)}"
    if len(text) > DESCRIPTION_MAX:
        raise ProviderError(
            f"gce: the cluster's gs:// buckets ({', '.join(names)}) are too many or too long "
            "to record on its service account; name fewer buckets in storage:"
        )
    return text


def parse_description(text: str) -> tuple[str, str, list[str]] | None:
    """(cluster uid, owner, buckets) from an account's description; None if not mlcloud's."""
    m = _DESCRIPTION.match(text or "")
    if not m:
        return None
    return m.group(1), m.group(2), [b for b in m.group(3).split(",") if b]


def title(uid: str) -> str:
    """The title of the cluster's conditions: how its bindings are told apart."""
    return f"mlcloud-{uid}"[:100]


def bindings(uid: str, member: str, storage: StorageAccess) -> dict[str, list[dict]]:
    """bucket -> the bindings to add to its policy: a role per location, limited to objects
    under the location's prefix (a whole bucket: no condition)."""
    write, read = gcs(storage)
    out: dict[str, list[dict]] = {}
    for role, locs in ((READ_WRITE, write), (READ_ONLY, read)):
        for loc in dict.fromkeys(locs):
            binding: dict[str, Any] = {"role": role, "members": [member]}
            if loc.prefix:
                prefix = loc.prefix + "/"
                binding["condition"] = {
                    "title": title(uid),
                    "description": f"objects under {loc}/",
                    "expression": (
                        f'resource.name.startsWith("projects/_/buckets/{loc.bucket}/objects/'
                        f'{prefix}") || api.getAttribute('
                        f'"storage.googleapis.com/objectListPrefix", "").startsWith("{prefix}")'
                    ),
                }
            out.setdefault(loc.bucket, []).append(binding)
    return out


def without(policy: dict, uid: str, member: str) -> dict:
    """The policy less the cluster's grants: its conditional bindings, and its member (also
    as IAM shows it once the account is deleted) wherever else it appears."""

    def ours(m: str) -> bool:
        return m == member or m.startswith(f"deleted:{member}?")

    kept = []
    for b in policy.get("bindings", []):
        if (b.get("condition") or {}).get("title") == title(uid):
            continue
        members = [m for m in b.get("members", []) if not ours(m)]
        if members:
            kept.append(dict(b, members=members))
    return dict(policy, bindings=kept)


class Accounts:
    """The IAM and bucket IAM calls for one project, with the user's credentials."""

    def __init__(self, creds: Any, project: str) -> None:
        from google.auth.transport.requests import AuthorizedSession
        from mlcloud.providers.gce import gcs as storage_api

        self.project = project
        self.session = AuthorizedSession(creds)
        self.iam = (os.environ.get(IAM_ENDPOINT_ENV) or IAM_ENDPOINT).rstrip("/")
        self.storage = storage_api.base()

    # -- the cluster's account ----------------------------------------------------------
    def ensure(self, uid: str, name: str, owner: str, storage: StorageAccess) -> list[str]:
        """Make (or find, on a resumed `up`) the cluster's account (`email(uid, project)`) and
        grant it the spec's gs:// locations; warnings for buckets whose policy it may not
        change."""
        address = email(uid, self.project)
        member = f"serviceAccount:{address}"
        grants = bindings(uid, member, storage)
        body = {
            "accountId": account_id(uid),
            "serviceAccount": {
                "displayName": f"mlcloud {name}"[:100],
                "description": description(uid, owner, sorted(grants)),
            },
        }
        r = self._call("POST", f"{self.iam}/v1/projects/{self.project}/serviceAccounts", body)
        if r.status_code == 409:  # made by an earlier `up` of this cluster
            r = self._call("GET", self._account_url(address))
        self._check(r, "create the cluster's service account", "iam.serviceAccounts.create")
        warnings = []
        for bucket, add in grants.items():
            why = self._grant(bucket, uid, member, add)
            if why:
                warnings.append(
                    f"storage gs://{bucket}: the cluster's service account could not be granted "
                    f"access ({why}); grant {address} {add[0]['role']} on it yourself"
                )
        return warnings

    def delete(self, uid: str) -> None:
        """Remove the cluster's grants from the buckets its account names, then the account;
        idempotent (a repeated `down`, a racing `gc`)."""
        address = email(uid, self.project)
        r = self._call("GET", self._account_url(address))
        if r.status_code in (403, 404):  # credentials that may not read IAM made no account
            return
        self._check(r, "read the cluster's service account", "iam.serviceAccounts.get")
        found = parse_description(r.json().get("description", ""))
        for bucket in found[2] if found else []:
            self._revoke(bucket, uid, f"serviceAccount:{address}")
        r = self._call("DELETE", self._account_url(address))
        if r.status_code != 404:
            self._check(r, "delete the cluster's service account", "iam.serviceAccounts.delete")

    def discover(self) -> list[tuple[str, str, str]]:
        """(email, cluster uid, owner) of every account mlcloud made in the project."""
        found, token = [], None
        while True:
            params = {"pageSize": "100"} | ({"pageToken": token} if token else {})
            r = self._call(
                "GET", f"{self.iam}/v1/projects/{self.project}/serviceAccounts", params=params
            )
            if r.status_code == 403:  # credentials that may not read IAM made no account
                return []
            self._check(r, "list service accounts", "iam.serviceAccounts.list")
            page = r.json()
            for a in page.get("accounts", []):
                parsed = parse_description(a.get("description", ""))
                if a.get("email", "").startswith(ACCOUNT_PREFIX) and parsed:
                    found.append((a["email"], parsed[0], parsed[1]))
            token = page.get("nextPageToken")
            if not token:
                return found

    # -- bucket policies ----------------------------------------------------------------
    def _grant(self, bucket: str, uid: str, member: str, add: list[dict]) -> str | None:
        """Put the cluster's bindings into the bucket's policy (its earlier ones replaced);
        why not, when the bucket is not the user's to change (403) or does not exist."""
        deadline = time.monotonic() + FRESH_ACCOUNT_WAIT_S
        while True:
            try:
                return self._update(bucket, lambda p: _with(without(p, uid, member), add))
            except _Refused as e:
                fresh = e.status == 400 and "does not exist" in e.message
                if not fresh or time.monotonic() > deadline:
                    if e.status in (403, 404):
                        return f"HTTP {e.status}: {e.message}"
                    _raise(e)
            time.sleep(FRESH_SLEEP_S)

    def _revoke(self, bucket: str, uid: str, member: str) -> None:
        try:
            self._update(bucket, lambda p: without(p, uid, member))
        except _Refused as e:
            if e.status != 404:  # a bucket deleted since: nothing left to revoke
                _raise(e)

    def _update(self, bucket: str, change) -> None:
        """Read, change and write the bucket's policy, again when another writer came first
        (the etag: 412)."""
        url = f"{self.storage}/storage/v1/b/{bucket}/iam"
        for _ in range(POLICY_TRIES):
            r = self._call("GET", url, params={"optionsRequestedPolicyVersion": "3"})
            if r.status_code >= 400:
                raise _Refused(r, f"read the IAM policy of gs://{bucket}")
            policy = r.json()
            new = change(policy)
            if new.get("bindings") == policy.get("bindings"):
                return None
            new = {k: new[k] for k in ("bindings", "etag") if k in new} | {"version": 3}
            r = self._call("PUT", url, new)
            if r.status_code == 412:
                continue
            if r.status_code >= 400:
                raise _Refused(r, f"change the IAM policy of gs://{bucket}")
            return None
        raise ProviderError(
            f"gce: the IAM policy of gs://{bucket} kept changing under us; run the command again"
        )

    # -- HTTP -----------------------------------------------------------------------------
    def _account_url(self, address: str) -> str:
        return f"{self.iam}/v1/projects/{self.project}/serviceAccounts/{address}"

    def _call(self, method: str, url: str, body: dict | None = None, params=None) -> Any:
        """One request, retried with backoff on 429 and 5xx; unreachable: ProviderError."""
        from google.auth import exceptions as aexc
        from mlcloud.providers.gce.api import HOW_TO_CONFIGURE

        for attempt in range(RETRIES):
            try:
                r = self.session.request(method, url, json=body, params=params, timeout=60)
            except aexc.RefreshError as e:
                raise AuthError(f"Google refused the credentials ({e}); {HOW_TO_CONFIGURE}") from e
            except OSError as e:
                raise ProviderError(f"gce: cannot reach {url.split('/v1/')[0]}: {e}") from e
            if r.status_code != 429 and r.status_code < 500 or attempt == RETRIES - 1:
                return r
            time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    @staticmethod
    def _check(r: Any, what: str, permission: str) -> None:
        from mlcloud.providers.gce import gcs as storage_api
        from mlcloud.providers.gce.api import HOW_TO_CONFIGURE

        if r.status_code < 400:
            return
        message = storage_api.error_text(r)
        if r.status_code == 401:
            raise AuthError(f"Google refused the credentials ({message}); {HOW_TO_CONFIGURE}")
        if r.status_code == 403:
            raise AuthError(
                f"gce: cannot {what}: permission denied ({message}); the credentials need "
                f"{permission} (the Service Account Admin role)"
            )
        raise ProviderError(f"gce: cannot {what}: HTTP {r.status_code}: {message}")


class _Refused(Exception):
    def __init__(self, r: Any, what: str) -> None:
        from mlcloud.providers.gce import gcs as storage_api

        self.status, self.message, self.what = r.status_code, storage_api.error_text(r), what
        super().__init__(f"{what}: HTTP {self.status}: {self.message}")


def _raise(e: _Refused) -> None:
    if e.status == 401:
        raise AuthError(f"gce: cannot {e.what}: Google refused the credentials ({e.message})")
    if e.status == 403:
        raise AuthError(
            f"gce: cannot {e.what}: permission denied ({e.message}); the credentials need "
            "storage.buckets.getIamPolicy and setIamPolicy on it"
        )
    raise ProviderError(f"gce: cannot {e.what}: HTTP {e.status}: {e.message}")


def _with(policy: dict, add: list[dict]) -> dict:
    return dict(policy, bindings=[*policy.get("bindings", []), *add])
