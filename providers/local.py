"""The local provider: N nodes on this machine, each a directory of its own.

Nodes share this machine's CPUs and GPUs but nothing else: each has its own code, job and
checkpoint directories, and its processes are found by tag, so `down` leaves none behind.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import ClassVar

from mlcloud.providers.base import (
    Capabilities,
    ClusterRef,
    MachinesAtHand,
    Node,
    Prepared,
    ProvisionRequest,
    Quote,
    Resource,
    SshOptions,
)

from mlcloud.errors import UsageError
from mlcloud.remote.local import LocalTransport
from mlcloud.remote.shell import stop_input, stop_line


class LocalProvider(MachinesAtHand):
    name: ClassVar[str] = "local"
    boot_timeout: ClassVar[float] = 0.0  # the machines are already up
    capabilities: ClassVar[Capabilities] = Capabilities()  # this machine is not ours to stop
    pythons: ClassVar[tuple[str, ...]] = (sys.executable,)  # the nodes are this machine

    @staticmethod
    def _base(cluster: ClusterRef) -> Path:
        from mlcloud.state import paths

        return paths.home() / "local" / cluster.uid

    def _node(self, cluster: ClusterRef, index: int) -> Node:
        return Node(
            f"local-{index}", "127.0.0.1", "127.0.0.1", str(self._base(cluster) / f"node-{index}")
        )

    def check(self, request: ProvisionRequest) -> None:
        if request.hosts:
            raise UsageError("hosts are for the ssh provider; drop them or use --provider ssh")
        if request.gpus or request.instance_type:
            raise UsageError(
                "the local provider uses this machine as it is: drop resources.gpus and "
                "resources.instance_type, or pick a cloud provider (--provider aws)"
            )
        cores = _machine_cores()
        if request.count > cores:
            # each node runs its own torchrun and workers: past one node per core the machine
            # thrashes and takes minutes to stop
            raise UsageError(
                f"--nodes {request.count}: the local provider runs at most one node per core "
                f"and this machine has {cores}; ask for {cores} or fewer"
            )

    def prepare(self, cluster: ClusterRef, request: ProvisionRequest) -> Prepared:
        return Prepared(request)

    def create(self, cluster: ClusterRef, request: ProvisionRequest, count: int) -> list[Node]:
        # numbered from the engine's first number, and after the highest here: a lost node-0
        # beside a live node-1 is replaced by node-2, and a lost node-1 by node-2 too (never
        # node-1 again: a teardown of the old one still under way would take the new one)
        held = max((int(n.node_id.rpartition("-")[2]) for n in self.list(cluster)), default=-1)
        first = max(request.first_number, held + 1)
        nodes = [self._node(cluster, first + i) for i in range(count)]
        for n in nodes:
            Path(n.root).mkdir(parents=True, mode=0o700)
        return nodes

    def list(self, cluster: ClusterRef) -> list[Node]:
        base = self._base(cluster)
        if not base.is_dir():
            return []
        indexes = sorted(int(p.name.split("-")[1]) for p in base.glob("node-*"))
        return [self._node(cluster, i) for i in indexes]

    def spares(self, cluster: ClusterRef) -> int | None:
        return None  # a node more is a directory more

    def terminate(self, cluster: ClusterRef, nodes: list[Node]) -> None:
        """Remove the node directories (the engine stopped their processes first)."""
        for n in nodes:
            shutil.rmtree(n.root, ignore_errors=True)

    def cleanup(self, cluster: ClusterRef) -> None:
        base = self._base(cluster)
        if base.is_dir() and not any(base.iterdir()):
            os.rmdir(base)

    # garbage collection: the node directories are the source of truth, state or not

    def discover(self, region: str | None) -> list[Resource]:
        """Every node directory under this home's local/<uid>/, whatever state says."""
        from mlcloud.state import paths

        base = paths.home() / "local"
        if not base.is_dir():
            return []
        owner = paths.home_id()
        found = []
        for cluster_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            uid = cluster_dir.name
            for node in sorted(cluster_dir.glob("node-*"), key=lambda p: p.name):
                found.append(
                    Resource(
                        self.name,
                        "node",
                        f"{uid}/{node.name}",
                        uid,
                        uid.rsplit("-", 1)[0],  # the uid is NAME-RANDOM
                        owner,
                        "",
                        created=node.stat().st_mtime,
                    )
                )
        return found

    def delete(self, resources: list[Resource]) -> None:
        """Stop each node's processes (found by tag), then remove its directory: with no
        state there is no engine teardown to have stopped them."""
        clusters = {}
        for r in resources:
            ref = clusters.setdefault(
                r.cluster_uid, ClusterRef(r.cluster_name, r.cluster_uid, r.owner)
            )
            node = self._node(ref, int(r.id.rpartition("/node-")[2]))
            t = LocalTransport(node.node_id)
            t.run(stop_line(t.python, node.root, ref.uid), stdin=stop_input())
            self.terminate(ref, [node])
        for ref in clusters.values():
            self.cleanup(ref)

    def recorded(self, cluster: ClusterRef) -> ProvisionRequest | None:
        return None  # the directories tell all

    def prices(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        return {}  # this machine is already paid for

    def quotes(self, pairs: list[tuple[str, str]], spot: bool) -> list[Quote]:
        return []

    def transport(
        self, cluster: ClusterRef, node: Node, label: str, ssh: SshOptions
    ) -> LocalTransport:
        """Nodes share this machine's GPUs: each sees a disjoint slice of them (none when
        there are fewer GPUs than nodes), so no two ranks land on one device."""
        total = _machine_gpus()
        if not total:
            return LocalTransport(label)
        nodes = max(len(self.list(cluster)), 1)
        index = int(node.node_id.split("-")[1])
        share = total // nodes
        visible = ",".join(str(g) for g in range(index * share, (index + 1) * share))
        return LocalTransport(label, env={"CUDA_VISIBLE_DEVICES": visible})


def _machine_cores() -> int:
    """The cores this process may run on (a container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_gpu_count: int | None = None


def _machine_gpus() -> int:
    """How many GPUs nvidia-smi lists on this machine (0 without a driver), asked once."""
    global _gpu_count
    if _gpu_count is None:
        import subprocess

        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            _gpu_count = len(out.stdout.split()) if out.returncode == 0 else 0
        except (OSError, subprocess.SubprocessError):
            _gpu_count = 0
    return _gpu_count
