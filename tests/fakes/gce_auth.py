"""Service-account credentials for the fake Compute API, made and checked the way Google does.

A key file is a fresh RSA key whose `token_uri` is the fake's `/token`. The real google-auth
then either trades a signed JWT for an access token there (the JWT-bearer grant) or, as the
Compute client does by default, signs its own JWT per request; the fake accepts both and
nothing else, so a client that sends no or foreign credentials gets Google's 401.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from pathlib import Path

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class Authority:
    """The keys the fake trusts and the access tokens it issued."""

    def __init__(self) -> None:
        self._keys: dict[str, object] = {}  # client_email -> RSA public key
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (email, expiry)
        self._lock = threading.Lock()

    def write_key_file(self, path: str | Path, project: str, token_uri: str) -> str:
        """Write a service-account key file (as the Cloud console gives it); returns its email."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = f"mlcloud-test-{secrets.token_hex(3)}@{project}.iam.gserviceaccount.com"
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        info = {
            "type": "service_account",
            "project_id": project,
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**21)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "universe_domain": "googleapis.com",
        }
        path = Path(path)
        path.write_text(json.dumps(info, indent=2))
        path.chmod(0o600)
        with self._lock:
            self._keys[email] = key.public_key()
        return email

    def owners(self) -> set[str]:
        """The accounts of the key files written (the user's: every bucket is theirs)."""
        with self._lock:
            return set(self._keys)

    def issue(self, email: str) -> str:
        """An access token for `email` (a VM's metadata server hands these out)."""
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (email, time.time() + 3600)
        return token

    def revoke(self) -> None:
        with self._lock:
            self._keys.clear()
            self._tokens.clear()

    def _verify_jwt(self, token: str) -> dict | None:
        """The claims of a JWT signed (RS256) by a trusted key and not expired, else None."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            head, body, sig = token.split(".")
            header = json.loads(_b64decode(head))
            claims = json.loads(_b64decode(body))
        except ValueError:
            return None
        key = self._keys.get(claims.get("iss", ""))
        if key is None or header.get("alg") != "RS256":
            return None
        try:
            key.verify(
                _b64decode(sig), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            return None
        if claims.get("exp", 0) < time.time():
            return None
        return claims

    def grant(self, form: dict[str, str]) -> tuple[int, dict]:
        """The token endpoint: a signed JWT assertion in, an access token out."""
        if form.get("grant_type") != JWT_BEARER:
            return 400, {
                "error": "unsupported_grant_type",
                "error_description": "Invalid grant_type",
            }
        claims = self._verify_jwt(form.get("assertion", ""))
        if claims is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (claims["iss"], time.time() + 3600)
        return 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

    def caller(self, authorization: str | None) -> str | None:
        """The service account behind an Authorization header, or None if it is not valid."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization[len("Bearer ") :].strip()
        with self._lock:
            issued = self._tokens.get(token)
        if issued is not None:
            return issued[0] if issued[1] > time.time() else None
        claims = self._verify_jwt(token)
        return claims["iss"] if claims else None
