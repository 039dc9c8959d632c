"""The test suite's network guard: no packet leaves loopback, no name goes to a resolver.

Loaded by the test process (conftest) and, through PYTHONPATH, by every Python process the
tests start (the CLI, drivers, node controllers on the local provider). An attempt is refused
(OSError) and written to $MLCLOUD_NETGUARD_LOG; conftest fails the test that made it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").split("%")[0]
    if host.lower() in _LOCAL_NAMES or host == socket.gethostname():
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: it would go to a resolver
    if ip.is_loopback or ip.is_unspecified:
        return True
    # networks the test made itself on this machine (its own network namespaces)
    made = os.environ.get("MLCLOUD_NETGUARD_ALLOW", "")
    return any(ip in ipaddress.ip_network(net) for net in made.split(",") if net)


def _refuse(what: str):
    log = os.environ.get("MLCLOUD_NETGUARD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {what}\n")
    raise OSError(errno.ENETUNREACH, f"network guard: {what} is outside loopback")


def install() -> None:
    if getattr(socket, "_mlcloud_guarded", False):
        return
    socket._mlcloud_guarded = True
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_sendto, real_getaddrinfo = socket.socket.sendto, socket.getaddrinfo
    real_gethostbyname, real_gethostbyname_ex = socket.gethostbyname, socket.gethostbyname_ex

    def _check_addr(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _refuse(f"connect to {address[0]}:{address[1]}")

    def connect(self, address):
        _check_addr(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        _check_addr(self, address)
        return real_connect_ex(self, address)

    def sendto(self, data, *args):
        _check_addr(self, args[-1])
        return real_sendto(self, data, *args)

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            _refuse(f"name lookup of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host):
        if not _loopback(host):
            _refuse(f"name lookup of {host}")
        return real_gethostbyname(host)

    def gethostbyname_ex(host):
        if not _loopback(host):
            _refuse(f"name lookup of {host}")
        return real_gethostbyname_ex(host)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex


if os.environ.get("MLCLOUD_NETGUARD_LOG"):
    install()
