"""Cloud Storage's JSON API as mlcloud reaches it from the launching machine: its address
(STORAGE_EMULATOR_HOST when set, the convention Google's own clients follow for emulators,
else storage.googleapis.com) and an HTTP session with the user's credentials. requests and
google-auth come with google-cloud-compute; both are imported only when called."""

from __future__ import annotations

import os
from typing import Any

ENDPOINT = "https://storage.googleapis.com"


def base() -> str:
    """Cloud Storage's address, without a trailing slash."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and "://" not in emulator:
        emulator = "http://" + emulator
    return (emulator or ENDPOINT).rstrip("/")


def session(creds: Any = None) -> Any:
    """A requests session that sends `creds` (default: Application Default Credentials).
    Without any credentials an emulator is reached anonymously, as Google's clients do; the
    real service is not (google.auth's DefaultCredentialsError)."""
    import requests

    if creds is None:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            creds, _ = google.auth.default(
                scopes=["https://www.googleapis.com/auth/devstorage.read_write"]
            )
        except DefaultCredentialsError:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                return requests.Session()
            raise
    from google.auth.transport.requests import AuthorizedSession

    return AuthorizedSession(creds)


def error_text(r: Any) -> str:
    """Google's message from an error answer (JSON error format), else the body's start."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200] or f"HTTP {r.status_code}"
