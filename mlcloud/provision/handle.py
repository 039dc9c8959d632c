"""A cluster from state, opened: its provider, its reference and a transport per node.

Every command that reaches a cluster opens one; whoever opened it closes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlcloud import providers, state
from mlcloud.errors import MlcloudError, NotFoundError
from mlcloud.providers.base import (
    ClusterRef,
    Node,
    Provider,
    SshOptions,
)
from mlcloud.remote.shell import CTL, STDLIB_PY, quote
from mlcloud.remote.transport import (
    Transport,
)
from mlcloud.spec.task import TaskSpec, check_cluster_name


@dataclass
class Handle:
    """A cluster from state with its provider and a transport per node, ready to use."""

    record: state.ClusterRecord
    provider: Provider
    ref: ClusterRef
    transports: list[Transport]

    @property
    def nodes(self) -> tuple[state.NodeRecord, ...]:
        return self.record.nodes

    def ctl(self, i: int) -> str:
        """The shell prefix that runs node_ctl.py on node i (not its torchrun: launch.py)."""
        t = self.transports[i]
        return f"{quote(t.python)} {STDLIB_PY} {quote(self.nodes[i].root + '/' + CTL)}"

    def close(self) -> None:
        for t in self.transports:
            t.close()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ref_of(rec: state.ClusterRecord) -> ClusterRef:
    return ClusterRef(rec.name, rec.uid, rec.owner, rec.spec.get("region"))


def provider_node(n: state.NodeRecord) -> Node:
    """A node as its provider knows it, from state."""
    return Node(n.node_id, n.ip, n.private_ip, n.root, n.status)


def open_cluster(store: state.Store, name: str, need_up: bool = True) -> Handle:
    check_cluster_name(name)
    rec = store.get_cluster(name)
    if rec is None:
        raise NotFoundError(
            f"no cluster named {name!r}; see `mlcloud status` or create it with `mlcloud up {name}`"
        )
    if need_up and rec.status != state.UP:
        raise MlcloudError(
            f"cluster {name!r} is {rec.status}, not UP; run `mlcloud up {name}` "
            f"to finish provisioning or `mlcloud down {name}`"
        )
    provider = providers.get(rec.provider)
    ref = ref_of(rec)
    ssh = ssh_options(rec.spec)
    transports = [provider.transport(ref, provider_node(n), f"node{n.idx}", ssh) for n in rec.nodes]
    for t, n in zip(transports, rec.nodes, strict=True):
        if n.python:  # found at bootstrap; clusters made before the probe keep the default
            t.python = n.python
    return Handle(rec, provider, ref, transports)


def find_job(
    store: state.Store, h: Handle, job_id: int | None, none_yet: str = ""
) -> state.JobRecord:
    """The cluster's job `job_id` (None: the newest of this incarnation), or one line saying
    there is none."""
    name = h.record.name
    job = store.get_job(name, job_id, h.record.uid)
    if job is None:
        raise NotFoundError(
            f"no job {job_id} on cluster {name!r}"
            if job_id is not None
            else f"no jobs on cluster {name!r} yet{none_yet}"
        )
    return job


def ssh_options(spec: dict) -> SshOptions:
    """SSH settings from a spec as stored in state."""
    d = dict(spec.get("ssh") or {})
    d["allowed_cidrs"] = tuple(d.get("allowed_cidrs") or ())
    return SshOptions(**{k: d.get(k) for k in SshOptions.__dataclass_fields__})


def owner(store: state.Store | None = None) -> str:
    """Who made a cluster: the store's identity (this home's id, or a shared store's own), so
    `gc` never takes another home's clusters for orphans, even those of another CI runner
    under the same OS user, while a team's homes on one shared store are one owner."""
    if store is not None:
        return store.identity()
    from mlcloud.state import paths

    return paths.home_id()


def workdir_of(spec: TaskSpec) -> Path:
    return Path(spec.workdir) if spec.workdir else Path.cwd()
