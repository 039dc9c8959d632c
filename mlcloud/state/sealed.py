"""A cluster's private keys on a shared store, sealed: AES-256-GCM (AEAD) under a key derived
with scrypt from the team's secret, MLCLOUD_STATE_KEY, and the store's own random salt. The
document's name is the associated data, so one cluster's sealed key cannot be passed off as
another's. No key is ever stored in clear, and the secret never leaves the process."""

from __future__ import annotations

import functools
import os

from mlcloud.providers.base import AuthError

VAR = "MLCLOUD_STATE_KEY"
_MAGIC = b"mlcloud-sealed-1:"


@functools.lru_cache(maxsize=4)
def _derive(secret: str, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=2**14, r=8, p=1).derive(secret.encode())


def _key(salt: bytes, why: str) -> bytes:
    secret = os.environ.get(VAR, "")
    if not secret:
        raise AuthError(
            f"{VAR} is not set: the shared store keeps clusters' SSH keys sealed with the "
            f"team's secret, needed to {why}; set {VAR} to it"
        )
    return _derive(secret, salt)


def seal(name: str, plain: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return _MAGIC + nonce + AESGCM(_key(salt, "store a key")).encrypt(nonce, plain, name.encode())


def unseal(name: str, blob: bytes, salt: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = _key(salt, "reach the cluster's nodes")
    if not blob.startswith(_MAGIC):
        raise AuthError(f"{name} on the shared store is not a sealed key; `mlcloud down` it")
    nonce, sealed = blob[len(_MAGIC) : len(_MAGIC) + 12], blob[len(_MAGIC) + 12 :]
    try:
        return AESGCM(key).decrypt(nonce, sealed, name.encode())
    except InvalidTag:
        raise AuthError(
            f"{VAR} does not open {name} on the shared store: it is not the secret the key was "
            "sealed with; set the team's secret"
        ) from None
