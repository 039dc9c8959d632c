"""Who the clouds see calling: the address a cluster's SSH rule opens to, and the public half
of the user's own key. Shared by the providers that make firewall rules and key pairs."""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlparse

from mlcloud.errors import UsageError


def cidr(endpoint: str) -> str:
    """The address the cloud at `endpoint` (a URL) sees us from, as a /32, without leaving this
    machine if possible.

    The source address of our route to the endpoint is it when that address is public, or when
    the endpoint is on this machine (an emulator); behind NAT only a lookup can tell, and that
    failing is a one-line error asking for ssh.allowed_cidrs."""
    host = urlparse(endpoint).hostname or ""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            target = ipaddress.ip_address(socket.gethostbyname(host))
            s.connect((str(target), 443))  # UDP: sends nothing
            source = ipaddress.ip_address(s.getsockname()[0])
        if source.is_global or target.is_loopback:
            return f"{source}/32"
    except OSError:
        pass
    address = _lookup()
    if address is None:
        raise UsageError(
            "cannot tell this machine's public address to open SSH to it; "
            "set ssh.allowed_cidrs (or --allow-ssh-from CIDR)"
        )
    return f"{address}/32"


def _lookup() -> str | None:
    """checkip.amazonaws.com, once, with a short timeout; None when offline."""
    if os.environ.get("MLCLOUD_OFFLINE"):
        return None
    import urllib.request

    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=3) as r:  # noqa: S310
            return str(ipaddress.ip_address(r.read().decode().strip()))
    except (OSError, ValueError):
        return None


def public_key(identity_file: str) -> str:
    """`type base64` of the user's key (ssh.identity_file), as clouds take it."""
    from mlcloud.remote.ssh import load_identity

    key = load_identity(identity_file)
    return f"{key.get_name()} {key.get_base64()}"
