"""SSH keys: one ed25519 key per cluster, and mlcloud's own pinned host keys.

Host keys are pinned on first contact under the node's identity (an instance id, or
[host]:port for machines the user already has) and a changed key is refused, never re-added.
The file is OpenSSH's known_hosts format, so `mlcloud ssh` can hand it to OpenSSH as is.

On a shared store both live there for every home (mlcloud/state/files.py): the pins as the
same text, a cluster's private keys sealed with the team's secret (mlcloud/state/sealed.py);
the files in the home are this home's copies, written from the store when missing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlcloud.errors import MlcloudError
from mlcloud.state import paths

_pin_lock = threading.Lock()


def known_hosts_path() -> Path:
    return paths.home() / "known_hosts"


def cluster_key_path(uid: str) -> Path:
    """The cluster's key file; on a shared store, written from it when this home lacks it
    (a home without MLCLOUD_STATE_KEY is told so, exit 5)."""
    path = paths.private_dir(paths.home() / "keys") / f"{uid}.ed25519"
    if not path.exists():
        _shared_key(path, create=False)
    return path


def ensure_cluster_key(uid: str) -> tuple[Path, str]:
    """(private key path, OpenSSH public key line); generated once, private file 0600."""
    path = cluster_key_path(uid)
    if path.exists() and path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return path, f"{_public(_key_at(path))} mlcloud-{uid}"


def peer_key_path(uid: str) -> Path:
    return paths.private_dir(paths.home() / "keys") / f"{uid}.peer.ed25519"


def ensure_peer_key(uid: str) -> tuple[bytes, str]:
    """(OpenSSH private key, public key) of the key a cluster's nodes reach each other with to
    pass the workdir on (mlcloud/remote/fanout.py). Apart from the login key: it goes to the
    relaying node, and the nodes let it run their receiver and nothing else."""
    path = peer_key_path(uid)
    private = _key_at(path)
    return path.read_bytes(), _public(private)


def _key_at(path: Path):
    """The ed25519 private key in path, generated there (0600) if there is none. On a shared
    store the key is the one sealed there (the first home's, of racers), copied to path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path.exists():
        return serialization.load_ssh_private_key(path.read_bytes(), password=None)
    shared = _shared_key(path, create=True)
    if shared is not None:
        return serialization.load_ssh_private_key(shared, password=None)
    private = Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_pem(private))
    return private


def _pem(private) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _shared_key(path: Path, create: bool) -> bytes | None:
    """The key named like path on the shared store, unsealed and written to path (0600); made
    and sealed there first if create and there is none. None without a shared store (or,
    without create, without the key there)."""
    from mlcloud.state import files, sealed

    if not files.shared():
        return None
    rel = f"keys/{path.name}"
    salt = files.salt()
    blob = files.read(rel)
    if blob is None:
        if not create:
            return None
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        blob = files.create(rel, sealed.seal(rel, _pem(Ed25519PrivateKey.generate()), salt))
    data = sealed.unseal(rel, blob, salt)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another thread of this home wrote it meanwhile: the same key
        return data
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return data


def _public(private) -> str:
    from cryptography.hazmat.primitives import serialization

    return (
        private.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def delete_cluster_key(uid: str) -> None:
    from mlcloud.state import files

    keys = paths.private_dir(paths.home() / "keys")
    for name in (f"{uid}.ed25519", f"{uid}.peer.ed25519"):
        (keys / name).unlink(missing_ok=True)
        if files.shared():
            files.remove(f"keys/{name}")


def fingerprint(key) -> str:
    """OpenSSH-style SHA256 fingerprint of a paramiko key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class HostKeyChanged(MlcloudError):
    pass


def check_or_pin(identity: str, key, label: str) -> bool:
    """Accept the key if it matches the pin, pin it if the identity is new (True), refuse a change.

    Thread- and process-safe: the file is re-read under a lock before it is written."""
    import paramiko

    path = known_hosts_path()
    with _pins(path):
        hosts = paramiko.HostKeys()
        if path.exists():
            hosts.load(str(path))
        known = hosts.lookup(identity)
        if known:
            pinned = known.get(key.get_name())
            if pinned is not None and pinned == key:
                return False
            old = pinned or next(iter(known.values()))
            raise HostKeyChanged(
                f"{label}: host key for {identity} changed (pinned {old.get_name()} "
                f"{fingerprint(old)}, now {key.get_name()} {fingerprint(key)}); refusing to "
                f"connect. If the machine was really rebuilt, forget the old key with: "
                f"ssh-keygen -R '{identity}' -f {path}"
            )
        hosts.add(identity, key.get_name(), key)
        _save(hosts, path)
        return True


def forget(identities: list[str]) -> None:
    """Drop pins (when a cluster's instances are terminated, their ids never come back)."""
    import paramiko

    path = known_hosts_path()
    with _pins(path):
        if not path.exists():
            return
        hosts = paramiko.HostKeys()
        hosts.load(str(path))
        for identity in identities:
            if identity in hosts:
                del hosts[identity]
        _save(hosts, path)


@contextmanager
def _pins(path: Path) -> Iterator[None]:
    """Every read-modify-write of the pins: one at a time (this process's threads, a file
    lock); on a shared store also one transaction there, the home's file first brought up to
    the store's text and the store given the file's once changed."""
    from filelock import FileLock

    from mlcloud.state import atomic, files

    with _pin_lock, FileLock(str(path) + ".lock", mode=0o600):
        if not files.shared():
            yield
            return
        with files.exclusive("known_hosts.lock"):
            text = files.read("known_hosts")
            before = path.read_bytes() if path.exists() else None
            if text is not None and text != before:
                atomic.write(path, text)
                before = text
            yield
            after = path.read_bytes() if path.exists() else None
            if after is not None and after != before:
                files.write("known_hosts", after)


def _save(hosts, path: Path) -> None:
    """paramiko's save writes in place: a kill mid-write would lose every pin. Write beside
    it, then rename over it."""
    from mlcloud.state import atomic

    try:
        with atomic.replacing(path) as tmp:
            hosts.save(str(tmp))
    except OSError as e:
        raise MlcloudError(
            f"cannot save pinned host keys to {path}: {e.strerror or e}; "
            "free some space or fix the permissions there"
        ) from None
