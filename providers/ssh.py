"""The ssh provider: machines the user already has (a lab box, an on-prem rack).

Nothing is created or powered off: `up` claims the hosts for the cluster; at `down` the engine
stops the cluster's processes on them and this provider removes its directories. Hosts listed
beyond the node count are spares: `create` claims the next free one when a lost node is
replaced. Which hosts a cluster holds is kept in a small file of this provider's own, since no
cloud API can be asked (on a shared store, a row every home reads: mlcloud/state/files.py).
"""

from __future__ import annotations

import getpass
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import ClassVar

from mlcloud.providers.base import (
    PYTHONS,
    Capabilities,
    CapacityError,
    ClusterRef,
    MachinesAtHand,
    Node,
    Prepared,
    ProviderError,
    ProvisionRequest,
    Quote,
    Resource,
    SshOptions,
)

from mlcloud.errors import UsageError
from mlcloud.parallel import fan_out
from mlcloud.remote.shell import STDLIB_PY, path_arg, quote, stop_input, stop_line
from mlcloud.remote.ssh import SshTarget, SshTransport
from mlcloud.remote.transport import RemoteError, check

_HOST_RE = re.compile(
    r"(?:(?P<user>[A-Za-z0-9._-]+)@)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|"
    r"(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d{1,5}))?"
)


@dataclass(frozen=True)
class Host:
    user: str | None
    host: str
    port: int | None

    def target(self, ssh: SshOptions) -> SshTarget:
        return SshTarget(
            host=self.host,
            port=self.port or ssh.port or 22,
            user=self.user or ssh.user or getpass.getuser(),
            identity_file=ssh.identity_file,
            proxy_command=ssh.proxy_command,
            python=ssh.python or "python3",
        )


CLAIMS_LOCK = ".claims.lock"  # beside the registries: every read-modify-write of them


def _machine(text: str, ssh: SshOptions) -> tuple[str, int]:
    """What makes two entries one machine: the address and the SSH port (whichever user)."""
    h = parse_host(text)
    return h.host.lower(), h.port or ssh.port or 22


def parse_host(text: str) -> Host:
    """`user@host:port`, `host`, `user@[::1]:22`; anything else is refused with the form."""
    m = _HOST_RE.fullmatch(text.strip())
    port = int(m["port"]) if m and m["port"] else None
    if not m or (port is not None and not 0 < port < 65536):
        raise UsageError(f"--hosts: {text!r} is not [user@]host[:port] (e.g. alice@10.0.0.5:22)")
    return Host(m["user"], m["v6"] or m["host"], port)


class SshProvider(MachinesAtHand):
    name: ClassVar[str] = "ssh"
    boot_timeout: ClassVar[float] = 0.0  # the machines are already up
    capabilities: ClassVar[Capabilities] = Capabilities()  # the user's hosts: never powered off
    pythons: ClassVar[tuple[str, ...]] = PYTHONS

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held = 0  # how deep this process is in _claims (under _lock: one thread at once)

    @staticmethod
    def _registry(cluster: ClusterRef) -> str:
        """Where its registry is: relative to the home, or its name on a shared store."""
        return f"ssh/{cluster.uid}.json"

    @contextmanager
    def _claims(self) -> Iterator[None]:
        """Every read-modify-write of the registries, whichever process or home makes it: one
        at a time (a file lock beside them or a shared store's transaction, and this process's
        threads in turn), so a host is claimed by one cluster exactly once, however many `up`s
        and controllers race for it. Held only around reading and writing the registries,
        never around a remote command."""
        from mlcloud.state import files

        with self._lock:
            if self._held:  # already held by this thread, further up
                yield
                return
            with files.exclusive(f"ssh/{CLAIMS_LOCK}"):
                self._held += 1
                try:
                    yield
                finally:
                    self._held -= 1

    def _read(self, cluster: ClusterRef) -> dict:
        from mlcloud.state import files

        f = self._registry(cluster)
        raw = files.read(f)
        if raw is None:
            return {"hosts": [], "claimed": [], "reached": []}
        try:
            data = json.loads(raw)
            if not isinstance(data.get("hosts"), list) or not isinstance(data.get("claimed"), list):
                raise ValueError("no host list")
        except (ValueError, AttributeError, OSError) as e:
            raise ProviderError(
                f"the ssh provider's host list for {cluster.name} ({files.where(f)}) is "
                f"unreadable ({e}); "
                f"`mlcloud down {cluster.name} --purge` forgets the cluster"
            ) from None
        data.setdefault("reached", list(data["claimed"]))  # older files: assume reached
        return data

    def _write(self, cluster: ClusterRef, data: dict) -> None:
        from mlcloud.state import files

        files.write(self._registry(cluster), json.dumps(data).encode())

    def _reached(self, cluster: ClusterRef, index: int) -> None:
        """Record a login on a host, before any command runs there: from then on, `down`
        must reach it to clean up."""
        from mlcloud.state import files

        with self._claims():
            if files.read(self._registry(cluster)) is None:  # torn down: nothing to claim
                return
            data = self._read(cluster)
            if index not in data["reached"]:
                data["reached"] = sorted(data["reached"] + [index])
                self._write(cluster, data)

    def _node(self, cluster: ClusterRef, index: int, host: str) -> Node:
        h = parse_host(host)
        port = f":{h.port}" if h.port else ""
        address = f"[{h.host}]" if ":" in h.host else h.host  # IPv6, as parse_host reads it
        return Node(
            f"{h.user + '@' if h.user else ''}{address}{port}",
            h.host,
            h.host,
            f"~/.mlcloud/{cluster.uid}/node-{index}",
        )

    def check(self, request: ProvisionRequest) -> None:
        if not request.hosts:
            raise UsageError(
                "the ssh provider needs the machines to use: --hosts "
                "user@h1,user@h2 or `hosts:` in the spec"
            )
        for h in request.hosts:
            parse_host(h)
        if request.count > len(request.hosts):
            raise UsageError(
                f"--nodes {request.count} but {len(request.hosts)} host(s) given; "
                "the ssh provider runs one node per host (more hosts than nodes: the rest are "
                "spares)"
            )
        if request.gpus or request.instance_type:
            raise UsageError(
                "the ssh provider uses the hosts as they are: drop resources.gpus and "
                "resources.instance_type"
            )

    def prepare(self, cluster: ClusterRef, request: ProvisionRequest) -> Prepared:
        with self._claims():
            data = self._read(cluster)
            data["hosts"] = list(request.hosts)
            data["ssh"] = asdict(request.ssh)
            self._write(cluster, data)
        return Prepared(request)

    def create(self, cluster: ClusterRef, request: ProvisionRequest, count: int) -> list[Node]:
        """Claim `count` of the cluster's hosts, all or nothing: none that this cluster or
        another one of this home holds. A host keeps its place in the list as its number."""
        with self._claims():
            data = self._read(cluster)
            ssh = SshOptions(**data.get("ssh", {}))
            elsewhere = self._claimed_elsewhere(cluster)
            free, taken = [], []
            for i, host in enumerate(data["hosts"]):
                if i in data["claimed"]:
                    continue
                other = elsewhere.get(_machine(host, ssh))
                (taken if other else free).append((i, other))
            if len(free) < count:
                why = (
                    ", ".join(f"{data['hosts'][i]} is held by cluster {c}" for i, c in taken)
                    + "; `mlcloud down` it first or list other hosts"
                    if taken
                    else "no spare host left"
                )
                raise CapacityError(
                    "", f"ssh: {count} more host(s) wanted for {cluster.name}: {why}"
                )
            claim = [i for i, _ in free[:count]]
            data["claimed"] = sorted(data["claimed"] + claim)
            self._write(cluster, data)
        nodes = [self._node(cluster, i, data["hosts"][i]) for i in claim]
        try:
            self._let_cluster_key_in(cluster, nodes, ssh)
        except BaseException:
            with self._claims():  # all or nothing: the hosts are free again
                fresh = self._read(cluster)
                fresh["claimed"] = [i for i in fresh["claimed"] if i not in claim]
                self._write(cluster, fresh)
            raise
        return nodes

    def _let_cluster_key_in(self, cluster: ClusterRef, nodes: list[Node], ssh: SshOptions) -> None:
        """On a shared store, have each host accept the cluster's own key, as the clouds do
        at launch, so that any home with the team's secret reaches it (templates/fanout.py
        `login`, in the file that host's sshd reads keys from); logged in with the user's."""
        from mlcloud import templates
        from mlcloud.remote import keys
        from mlcloud.state import files

        if not files.shared():
            return
        _, public = keys.ensure_cluster_key(cluster.uid)
        public = " ".join(public.split()[:2])
        programs = [(n, templates.path(n).read_bytes()) for n in ("receive.py", "fanout.py")]

        def one(node: Node) -> None:
            index = int(node.root.rsplit("-", 1)[1])
            t = self.transport(cluster, node, f"node{index}", ssh)
            root = path_arg(node.root)
            line = f"umask 077 && mkdir -p {root}/bin"
            for name, source in programs:
                line += f" && head -c {len(source)} > {root}/bin/{name}"
            fanout = f"{quote(t.python)} {STDLIB_PY} {root}/bin/fanout.py"
            line += f" && {fanout} login {root} {quote(public)}"
            try:
                stdin = b"".join(source for _, source in programs)
                check(t.run(line, stdin=stdin, timeout=60), t, "letting the cluster's key in")
            finally:
                t.close()

        fan_out(one, nodes)

    def _claimed_elsewhere(self, cluster: ClusterRef) -> dict[tuple[str, int], str]:
        """(address, port) -> the name of the other cluster that holds that machine."""
        from mlcloud.state import files

        held = {}
        for uid, _ in files.listing("ssh", ".json"):
            if uid == cluster.uid:
                continue
            other = ClusterRef(uid.rsplit("-", 1)[0], uid, "")  # the uid is NAME-RANDOM
            try:
                data = self._read(other)
            except ProviderError:
                continue  # unreadable: `down --purge` or `gc` deals with it
            ssh = SshOptions(**data.get("ssh", {}))
            for i in data["claimed"]:
                if i < len(data["hosts"]):
                    held[_machine(data["hosts"][i], ssh)] = other.name
        return held

    def spares(self, cluster: ClusterRef) -> int | None:
        """Hosts listed but not claimed: what is left to replace lost nodes with."""
        data = self._read(cluster)
        return len(data["hosts"]) - len(data["claimed"])

    def list(self, cluster: ClusterRef) -> list[Node]:
        data = self._read(cluster)
        return [self._node(cluster, i, data["hosts"][i]) for i in data["claimed"]]

    def terminate(self, cluster: ClusterRef, nodes: list[Node]) -> None:
        """Remove the cluster's directory on each host (the engine stopped its processes
        first); hosts stay on.

        A host that cannot be reached stays claimed (its processes may still run) and is named
        in the error, so `down` can be run again once it is back; one mlcloud never logged in
        to has nothing of the cluster's and is let go."""
        data = self._read(cluster)
        ssh = SshOptions(**data.get("ssh", {}))

        def release(index: int) -> None:
            with self._claims():
                fresh = self._read(cluster)
                fresh["claimed"] = [i for i in fresh["claimed"] if i != index]
                fresh["reached"] = [i for i in fresh["reached"] if i != index]
                self._write(cluster, fresh)

        def one(node: Node) -> str | None:
            index = int(node.root.rsplit("-", 1)[1])
            if index not in data["reached"]:
                release(index)  # never logged in there: nothing of the cluster's to remove
                return None
            t = self.transport(cluster, node, f"node{index}", ssh)
            try:
                t.run(
                    f"{quote(t.python)} {STDLIB_PY} {path_arg(node.root)}/bin/fanout.py logout "
                    f"{path_arg(node.root)} 2>/dev/null; "
                    f"rm -rf {path_arg(node.root)}; "
                    f"rmdir {path_arg(node.root.rsplit('/', 1)[0])} 2>/dev/null; true",
                    timeout=120,
                )
            except RemoteError as e:
                return str(e)
            finally:
                t.close()
            release(index)
            return None

        errors = [e for e in fan_out(one, nodes) if e]
        if errors:
            raise ProviderError(
                f"{errors[0]}"
                + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                + "; its processes may still run: run `mlcloud down` again once it is reachable"
            )

    def cleanup(self, cluster: ClusterRef) -> None:
        from mlcloud.state import files

        with self._claims():
            files.remove(self._registry(cluster))

    # garbage collection: the host registries are what this provider holds, state or not

    def discover(self, region: str | None) -> list[Resource]:
        """Every host a registry in this home (or the shared store) says a cluster holds,
        whatever state says."""
        from mlcloud import state
        from mlcloud.state import files

        store = state.open_store()
        try:
            owner = store.identity()
        finally:
            store.close()
        found = []
        for uid, created in files.listing("ssh", ".json"):
            ref = ClusterRef(uid.rsplit("-", 1)[0], uid, owner)  # the uid is NAME-RANDOM
            for node in self.list(ref):
                index = node.root.rsplit("-", 1)[1]
                found.append(
                    Resource(
                        self.name,
                        "host",
                        f"{uid}/node-{index}",
                        uid,
                        ref.name,
                        owner,
                        "",
                        created=created,
                    )
                )
        return found

    def delete(self, resources: list[Resource]) -> None:
        """Stop the cluster's processes on each host, remove its directories, release the
        hosts: with no state there is no engine teardown to have stopped them."""
        by_cluster: dict[str, list[Resource]] = {}
        for r in resources:
            by_cluster.setdefault(r.cluster_uid, []).append(r)
        for uid, items in by_cluster.items():
            ref = ClusterRef(items[0].cluster_name, uid, items[0].owner)
            data = self._read(ref)
            ssh = SshOptions(**data.get("ssh", {}))
            wanted = {r.id.rpartition("/")[2] for r in items}
            nodes = [n for n in self.list(ref) if n.root.rsplit("/", 1)[1] in wanted]
            reached = [n for n in nodes if int(n.root.rsplit("-", 1)[1]) in data["reached"]]

            def stop(node: Node, ref: ClusterRef = ref, ssh: SshOptions = ssh) -> None:
                t = self.transport(ref, node, node.node_id, ssh)
                try:
                    t.run(stop_line(t.python, node.root, ref.uid), timeout=120, stdin=stop_input())
                except RemoteError:
                    pass  # unreachable: terminate says so, and keeps the host claimed
                finally:
                    t.close()

            fan_out(stop, reached)  # a host never logged in to runs nothing of the cluster's
            self.terminate(ref, nodes)
            if not self.list(ref):
                self.cleanup(ref)

    def recorded(self, cluster: ClusterRef) -> ProvisionRequest | None:
        """The hosts and SSH settings its registry keeps."""
        data = self._read(cluster)
        return ProvisionRequest(
            len(data["claimed"]), hosts=tuple(data["hosts"]), ssh=SshOptions(**data.get("ssh", {}))
        )

    def prices(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        return {}  # the user's own machines: nothing to price

    def quotes(self, pairs: list[tuple[str, str]], spot: bool) -> list[Quote]:
        return []

    def transport(
        self, cluster: ClusterRef, node: Node, label: str, ssh: SshOptions
    ) -> SshTransport:
        from dataclasses import replace

        from mlcloud.remote import keys
        from mlcloud.state import files

        index = int(node.root.rsplit("-", 1)[1])
        target = parse_host(node.node_id).target(ssh)
        if files.shared():  # the hosts accept the cluster's key (_let_cluster_key_in)
            target = replace(target, fallback_identity=str(keys.cluster_key_path(cluster.uid)))
        return SshTransport(
            target,
            label,
            on_connect=lambda: self._reached(cluster, index),
        )
