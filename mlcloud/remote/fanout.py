"""Ship the workdir once over this machine's link: the client streams it to one node (the
relay: the first that needs it, the head on a first sync) and the relay passes it on to the
others over the cluster's own network (templates/fanout.py), with the same manifest and delta
rules. The relay reaches its peers with the cluster's peer key (mlcloud/remote/keys.py), which the
nodes accept for their receiver only, and checks them against the host keys pinned here.

A peer the relay could not serve is synced from here, and so is every node when the relay
has no SSH client or a node's address inside the cluster is unknown. Nodes that are
directories on this machine (local) sync as before.

The stream is zstd where every node it reaches decodes it (the probe asks each node's
Python), else zlib: the relay passes it on as it came, and each receiver decodes what the
stream says.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mlcloud.parallel import fan_out
from mlcloud.remote import keys, sync
from mlcloud.remote.shell import STDLIB_PY, quote
from mlcloud.remote.ssh import SshTransport
from mlcloud.remote.transport import RemoteError, SyncStats, Transport, check

MARK = "@mlcloud:"
PROBE_END = f"{MARK}manifest"
# Relay once it saves this machine's link this much: below it, a direct sync to each node
# costs less than the relay's SSH sessions between nodes (about a second), so a change of a
# few files goes straight to every node; above it the client sends about 1x, whatever N.
RELAY_ABOVE = 256_000


@dataclass(frozen=True)
class Target:
    """A node to sync: its transport and its directory (the workdir is ROOT/workdir)."""

    transport: Transport
    root: str

    @property
    def dest(self) -> str:
        return f"{self.root}/workdir"

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Probe:
    """What one round trip tells about a node before a sync."""

    manifest: sync.Manifest
    address: tuple[str, int] | None  # where its sshd answered: how a peer reaches it
    has_ssh: bool  # an OpenSSH client to relay with
    has_key: bool  # the peer key, to relay with
    stamp: str  # what fanout.py installed there
    zstd: bool  # its Python decodes zstd (templates/receive.py)

    @property
    def codec(self) -> str:
        return sync.ZSTD if self.zstd else sync.ZLIB


def sync_nodes(
    targets: list[Target],
    src: Path,
    uid: str,
    note: Callable[[str], None] = lambda _: None,
    relay_above: int = RELAY_ABOVE,
) -> list[SyncStats]:
    """Make every target's workdir mirror src; the stats say what each node received, and
    note hears why a node was synced from here after all. The workdir is relayed when sending
    it to each node would cost this machine's link relay_above bytes more than sending it once."""
    if not targets or not all(
        isinstance(t.transport, SshTransport) and t.root.startswith("/") for t in targets
    ):
        return fan_out(lambda i: targets[i].transport.sync(src, targets[i].dest), _all(targets))
    probes = fan_out(lambda i: _probe(targets[i]), _all(targets))
    local = sync.scan(src, previous=probes[0].manifest)
    stats = [_stats(local, p.manifest) for p in probes]
    need = [i for i, s in enumerate(stats) if s.files_sent or s.files_deleted]
    direct = set(need)
    relaying = len(need) > 1 and (len(need) - 1) * stats[need[0]].bytes_sent >= relay_above
    if relaying and probes[need[0]].has_ssh:
        known = {i: _known_host(targets[i], probes[i]) for i in need[1:]}
        relay, peers = need[0], [i for i in need[1:] if known[i]]
        private, public = keys.ensure_peer_key(uid)
        refused = _install(targets, probes, [relay, *peers], relay, private, public)
        for _, why in sorted(refused.items()):
            note(f"{why}; sending the workdir to it from here")
        peers = [i for i in peers if i not in refused]
        if peers and relay not in refused:
            failed = _relay(targets, probes, relay, peers, known, src, local)
            for i, why in sorted(failed.items()):
                label, via = targets[i].transport.label, targets[relay].transport.label
                note(f"{label}: not reached from {via} ({why}); sending it from here")
            direct -= {relay, *peers} - failed.keys()
    elif relaying:
        label = targets[need[0]].transport.label
        note(f"{label} has no ssh client to pass the workdir on; sending it to each node from here")

    def push(i: int) -> None:
        t, probe = targets[i], probes[i]
        sync.push(t.transport, src, t.dest, probe.manifest, local, probe.codec)

    fan_out(push, sorted(direct))
    return [
        replace(s, relayed=i in need and i not in direct and i != need[0])
        for i, s in enumerate(stats)
    ]


def _all(targets: list[Target]) -> list[int]:
    return list(range(len(targets)))


def _stats(local: sync.Manifest, remote: sync.Manifest) -> SyncStats:
    send, delete = sync.diff(local, remote)
    return SyncStats(len(send), sum(local[p].size for p in send), len(delete))


# Whether the node's Python decodes zstd as templates/receive.py does: with site-packages
# (the receiver, run with -S, adds them when a stream is zstd).
ZSTD_CHECK = "try:\n import compression.zstd\nexcept ImportError:\n import zstandard"


def _probe(t: Target) -> Probe:
    """The node's manifest, the address its sshd answered on, what it has for relaying, and
    whether its Python decodes zstd."""
    root = quote(t.root)
    cmd = (
        f'echo "{MARK}ssh=${{SSH_CONNECTION:-}}"; '
        f'command -v ssh >/dev/null 2>&1 && echo "{MARK}client"; '
        f"{quote(t.transport.python)} -I -c {quote(ZSTD_CHECK)} >/dev/null 2>&1 "
        f'&& echo "{MARK}zstd"; '
        f'[ -f {root}/peer/id_ed25519 ] && echo "{MARK}key"; '
        f'echo "{MARK}stamp=$(cat {root}/peer/stamp 2>/dev/null)"; '
        f'echo "{PROBE_END}"; cat {quote(t.dest)}/{sync.MANIFEST} 2>/dev/null; true'
    )
    out = check(t.transport.run(cmd), t.transport, "reading the workdir's manifest").stdout
    head, _, manifest = out.partition(PROBE_END + "\n")
    marks = {}
    for line in head.splitlines():
        if line.startswith(MARK):
            key, _, value = line[len(MARK) :].partition("=")
            marks[key] = value.strip()
    seen = marks.get("ssh", "").split()
    address = (seen[2], int(seen[3])) if len(seen) == 4 and seen[3].isdigit() else None
    return Probe(
        sync.load(manifest.encode() or b"{}"),
        address,
        "client" in marks,
        "key" in marks,
        marks.get("stamp", ""),
        "zstd" in marks,
    )


def _known_host(t: Target, probe: Probe) -> str | None:
    """The known_hosts lines the relay checks this peer against: its host key as pinned here,
    under the address it answered on. None when either is unknown."""
    import paramiko

    if probe.address is None or "\n" in t.root:
        return None
    path = keys.known_hosts_path()
    hosts = paramiko.HostKeys()
    if path.exists():
        hosts.load(str(path))
    pinned = hosts.lookup(t.transport.target.pin_id)  # type: ignore[attr-defined]
    if not pinned:
        return None
    addr, port = probe.address
    where = addr if port == 22 and ":" not in addr else f"[{addr}]:{port}"
    return "".join(f"{where} {k.get_name()} {k.get_base64()}\n" for k in pinned.values())


def _sources() -> tuple[bytes, bytes]:
    from mlcloud import templates

    return templates.path("receive.py").read_bytes(), templates.path("fanout.py").read_bytes()


def _stamp(t: Target, public: str) -> str:
    """What an install leaves on a node: the same programs, key and interpreter, or redo it."""
    h = hashlib.sha256()
    for part in (*_sources(), public.encode(), t.transport.python.encode()):
        h.update(part + b"\0")
    return h.hexdigest()[:16]


def _install(
    targets: list[Target],
    probes: list[Probe],
    nodes: list[int],
    relay: int,
    private: bytes,
    public: str,
) -> dict[int, str]:
    """Put fanout.py and receive.py under each node's bin/ and let the peer key in there, where
    not done already; the relay also gets the private key. One round trip per node that needs
    it, in parallel. Returns the nodes where it failed, and why: they are synced from here."""
    receiver, sender = _sources()

    def one(i: int) -> str | None:
        t = targets[i]
        stamp = _stamp(t, public)
        give_key = i == relay and not probes[i].has_key
        if probes[i].stamp == stamp and not give_key:
            return None
        root = quote(t.root)
        cmd = (
            f"umask 077 && mkdir -p {root}/bin {root}/peer "
            f"&& head -c {len(receiver)} > {root}/bin/receive.py "
            f"&& head -c {len(sender)} > {root}/bin/fanout.py "
            + (f"&& head -c {len(private)} > {root}/peer/id_ed25519 " if give_key else "")
            + f"&& {quote(t.transport.python)} {STDLIB_PY} {root}/bin/fanout.py authorize {root} "
            f"{quote(public)} {stamp}"
        )
        stdin = receiver + sender + (private if give_key else b"")
        try:
            check(t.transport.run(cmd, stdin=stdin), t.transport, "installing the fan-out")
        except RemoteError as e:
            return str(e)
        return None

    return {i: why for i, why in zip(nodes, fan_out(one, nodes), strict=True) if why}


def _relay(
    targets: list[Target],
    probes: list[Probe],
    relay: int,
    peers: list[int],
    known: dict[int, str | None],
    src: Path,
    local: sync.Manifest,
) -> dict[int, str]:
    """Send the stream to the relay, which applies it and passes it on; the peers it could not
    serve, and why, for the caller to sync directly. zstd when relay and peers decode it."""
    t = targets[relay]
    send, delete = sync.diff(local, probes[relay].manifest)
    codec = sync.ZSTD if all(probes[i].zstd for i in [relay, *peers]) else sync.ZLIB
    by_name = {targets[i].name: i for i in peers}
    config = {
        "peers": [
            {
                "name": targets[i].name,
                "host": probes[i].address[0],  # type: ignore[index]
                "port": probes[i].address[1],  # type: ignore[index]
                "user": targets[i].transport.target.user,  # type: ignore[attr-defined]
            }
            for i in peers
        ],
        "known_hosts": "".join(known[i] or "" for i in peers),
    }
    root = quote(t.root)
    cmd = f"{quote(t.transport.python)} {STDLIB_PY} {root}/bin/fanout.py relay {root}"
    # sent as it is packed: the client compresses while the nodes receive
    stdin = itertools.chain(
        [json.dumps(config).encode() + b"\n"], sync.frames(src, send, delete, local, codec)
    )
    result = check(t.transport.run(cmd, stdin=stdin), t.transport, "syncing the workdir")
    try:
        failed = json.loads(result.stdout.strip().splitlines()[-1])["failed"]
        return {by_name[name]: str(why) for name, why in failed.items()}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise RemoteError(
            f"{t.transport.label}: passing the workdir on: answer not understood"
        ) from None
