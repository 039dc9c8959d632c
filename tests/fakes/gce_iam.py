"""The IAM API v1's service accounts on the fake's address (iam.googleapis.com's paths).

    POST   /v1/projects/P/serviceAccounts          create {accountId, serviceAccount: {...}}
    GET    /v1/projects/P/serviceAccounts          list (pageSize, pageToken)
    GET    /v1/projects/P/serviceAccounts/EMAIL    get (EMAIL or uniqueId; P may be "-")
    DELETE /v1/projects/P/serviceAccounts/EMAIL    delete: {} (its bucket grants stay, as in
                                                   GCP, shown as deleted:serviceAccount:...)

Shapes and errors as Google documents them: accountId is 6-30 characters of [a-z0-9-],
starting with a letter and not ending with '-'; a taken id is 409 ALREADY_EXISTS; an unknown
account 404 NOT_FOUND. Errors come as google.rpc.Status ({"error": {code, message, status}}).
"""

from __future__ import annotations

import base64
import re
import secrets
import threading
import time

from .gce_model import ApiError

ACCOUNT_ID_RE = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")


def _error(code: int, status: str, message: str) -> ApiError:
    reason = {400: "badRequest", 404: "notFound", 409: "alreadyExists"}.get(code, "error")
    return ApiError(code, reason, message, status=status)


class Iam:
    """Service accounts per project, in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, dict] = {}  # email -> ServiceAccount
        self._made: dict[str, float] = {}  # email -> when it was made
        self.lag = 0.0  # seconds a new account stays unknown to other services (iam_lag)

    def fresh(self, email: str) -> bool:
        """Made less than `lag` seconds ago: IAM is eventually consistent, so a bucket's
        setIamPolicy does not know the account yet."""
        with self._lock:
            return time.monotonic() - self._made.get(email, -1e9) < self.lag

    def service_accounts(self, project: str | None = None) -> list[dict]:
        with self._lock:
            return [dict(a) for a in self._accounts.values() if project in (None, a["projectId"])]

    def exists(self, email: str) -> bool:
        with self._lock:
            return email in self._accounts

    def create(self, project: str, body: dict) -> dict:
        account_id = body.get("accountId", "")
        if not ACCOUNT_ID_RE.fullmatch(account_id):
            raise _error(
                400,
                "INVALID_ARGUMENT",
                f"Invalid account_id '{account_id}': it must be 6-30 characters of lowercase "
                "letters, digits and hyphens, start with a letter and not end with a hyphen.",
            )
        email = f"{account_id}@{project}.iam.gserviceaccount.com"
        sa = body.get("serviceAccount") or {}
        if len(sa.get("displayName", "")) > 100 or len(sa.get("description", "")) > 256:
            raise _error(400, "INVALID_ARGUMENT", "displayName or description too long.")
        uid = str(10**20 + secrets.randbelow(10**20))
        account = {
            "name": f"projects/{project}/serviceAccounts/{email}",
            "projectId": project,
            "uniqueId": uid,
            "email": email,
            "etag": base64.b64encode(secrets.token_bytes(6)).decode(),
            "oauth2ClientId": uid,
        }
        for key in ("displayName", "description"):
            if sa.get(key):
                account[key] = sa[key]
        with self._lock:
            if email in self._accounts:
                raise _error(
                    409,
                    "ALREADY_EXISTS",
                    f"Service account {account_id} already exists within project "
                    f"projects/{project}.",
                )
            self._accounts[email] = account
            self._made[email] = time.monotonic()
        return dict(account)

    def _find(self, project: str, ref: str) -> dict:
        for a in self._accounts.values():
            if ref in (a["email"], a["uniqueId"]) and project in ("-", a["projectId"]):
                return a
        raise _error(
            404, "NOT_FOUND", f"Unknown service account: projects/{project}/serviceAccounts/{ref}"
        )

    def get(self, project: str, ref: str) -> dict:
        with self._lock:
            return dict(self._find(project, ref))

    def delete(self, project: str, ref: str) -> dict:
        with self._lock:
            account = self._find(project, ref)
            del self._accounts[account["email"]]
        return {}

    def list(self, project: str, query: dict) -> dict:
        try:
            size = max(1, min(int(query.get("pageSize") or 20), 100))
        except ValueError:
            raise _error(400, "INVALID_ARGUMENT", "Invalid pageSize") from None
        with self._lock:
            emails = sorted(e for e, a in self._accounts.items() if a["projectId"] == project)
            start = query.get("pageToken", "")
            page = [e for e in emails if e > start][:size]
            out = {"accounts": [dict(self._accounts[e]) for e in page]}
            if page and page[-1] != emails[-1]:
                out["nextPageToken"] = page[-1]
        if not out["accounts"]:
            del out["accounts"]
        return out
