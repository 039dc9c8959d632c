"""Cluster lifecycle: up (intent row, create, bootstrap) and down (terminate, confirm, drop)."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlcloud import providers, state
from mlcloud.cost import Interval
from mlcloud.errors import MlcloudError, NotFoundError, UsageError
from mlcloud.locks import cluster_lock
from mlcloud.names import check_cluster_name
from mlcloud.parallel import fan_out
from mlcloud.providers.base import (
    CapacityError,
    ClusterRef,
    Node,
    Provider,
    ProviderError,
    ProvisionRequest,
    QuotaError,
    SshOptions,
)
from mlcloud.remote.layout import CTL
from mlcloud.remote.shell import path_arg, quote
from mlcloud.remote.transport import RemoteError, Transport, UnreachableError, check
from mlcloud.report import Reporter
from mlcloud.spec import TaskSpec


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
        """The shell prefix that runs node_ctl.py on node i."""
        import shlex

        t = self.transports[i]
        return f"{shlex.quote(t.python)} {shlex.quote(self.nodes[i].root + '/' + CTL)}"

    def close(self) -> None:
        for t in self.transports:
            t.close()


def _ref(rec: state.ClusterRecord) -> ClusterRef:
    return ClusterRef(rec.name, rec.uid, rec.owner, rec.spec.get("region"))


def _node(n: state.NodeRecord) -> Node:
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
    ref = _ref(rec)
    ssh = ssh_options(rec.spec)
    transports = [provider.transport(ref, _node(n), f"node{n.idx}", ssh) for n in rec.nodes]
    return Handle(rec, provider, ref, transports)


def ssh_options(spec: dict) -> SshOptions:
    """SSH settings from a spec as stored in state."""
    d = dict(spec.get("ssh") or {})
    d["allowed_cidrs"] = tuple(d.get("allowed_cidrs") or ())
    return SshOptions(**{k: d.get(k) for k in SshOptions.__dataclass_fields__})


def request_for(spec: TaskSpec, count: int) -> ProvisionRequest:
    return ProvisionRequest(
        hosts=tuple(spec.hosts),
        ssh=ssh_options(spec.to_dict()),
        count=count,
        gpus=str(spec.resources.gpus) if spec.resources.gpus else None,
        instance_type=spec.resources.instance_type,
        cpus=spec.resources.cpus,
        region=spec.region,
        zone=spec.zone,
        spot=spec.spot,
        max_price=spec.spot_max_price,
        image=spec.image,
        disk_gb=spec.resources.disk_gb,
    )


def up(
    store: state.Store,
    name: str,
    spec: TaskSpec,
    report: Reporter,
    price: float = 0.0,
    fallback_regions: tuple[str, ...] = (),
) -> state.ClusterRecord:
    """Bring a cluster to UP; re-running after a crash reuses what the provider already has."""
    check_cluster_name(name)
    provider = providers.get(spec.provider)
    provider.check(request_for(spec, spec.node_count))
    with cluster_lock(name):
        existing = store.get_cluster(name)
        if existing is not None:
            if existing.provider != provider.name:
                raise UsageError(
                    f"cluster {name!r} already exists on provider {existing.provider!r}; "
                    f"pick another name or `mlcloud down {name}` first"
                )
            if existing.status == state.UP:
                if len(existing.nodes) != spec.node_count:
                    raise UsageError(
                        f"cluster {name!r} is up with {len(existing.nodes)} node(s), not "
                        f"{spec.node_count}; `mlcloud down {name}` first to change its size"
                    )
                report.info(f"cluster {name} is already up ({len(existing.nodes)} nodes)")
                return existing
            if existing.status == state.STOPPING:
                raise MlcloudError(
                    f"cluster {name!r} is being torn down; run "
                    f"`mlcloud down {name}` to finish, then `up` again"
                )
            ref = _ref(existing)
            report.info(f"resuming the provisioning of {name} (found in state as INIT)")
        else:
            ref = ClusterRef(name, f"{name}-{secrets.token_hex(4)}", owner())
            store.create_cluster(name, ref.uid, provider.name, spec.to_dict(), ref.owner)
        try:
            return _provision(store, provider, ref, spec, report, price, fallback_regions)
        except BaseException as e:
            if existing is None:
                rec = store.get_cluster(name)
                _rollback(store, provider, _ref(rec) if rec else ref, report, e)
            raise


def _provision(
    store: state.Store,
    provider: Provider,
    ref: ClusterRef,
    spec: TaskSpec,
    report: Reporter,
    price: float,
    fallback_regions: tuple[str, ...] = (),
) -> state.ClusterRecord:
    """Create what is missing, failing over zone by zone on capacity, and region by region on
    capacity or quota (quotas are regional: a region over quota is left at once)."""
    want = spec.node_count
    request = replace(request_for(spec, want), fallback_regions=fallback_regions)
    places, resumed_image = _places(store, provider, ref, request)
    refusals: list[CapacityError | QuotaError] = []
    over_quota: set[str | None] = set()
    for n, (region, zone) in enumerate(places):
        if region in over_quota:
            continue
        here = replace(ref, region=region)
        image = request.image or (resumed_image if region == ref.region else None)
        req = replace(request, region=region, zone=zone, image=image)
        # recorded before anything is made there, so `down` and a re-run find it
        store.set_spec(ref.name, {**spec.to_dict(), "region": region, "zone": zone})
        report.step(
            f"preparing {provider.name} resources for {ref.name}"
            + (f" in {zone or region}" if region else "")
        )
        prepared = provider.prepare(here, req)
        for warning in prepared.warnings:
            report.warn(warning)
        req = prepared.request
        store.set_spec(ref.name, _recorded(spec, req))  # the provider's choices, for later
        nodes = provider.list(here)
        try:
            if len(nodes) < want:
                report.step(f"creating {want - len(nodes)} node(s)")
                nodes = nodes + provider.create(here, req, want - len(nodes))
        except (CapacityError, QuotaError) as e:
            refusals.append(e)
            quota = isinstance(e, QuotaError)
            if quota:
                over_quota.add(region)
            report.warn(f"{e}; trying elsewhere")
            store.event(ref.name, "quota" if quota else "capacity", str(e))
            rest = [p for p in places[n + 1 :] if p[0] not in over_quota]
            if (not rest or rest[0][0] != region) and not provider.list(here):
                provider.cleanup(here)
            continue
        break
    else:
        raise _refused(refusals, f"{want} x {request.instance_type or 'node'}")
    if len(nodes) > want:
        provider.terminate(here, nodes[want:])
        nodes = nodes[:want]
    report.step(f"waiting for {len(nodes)} node(s) to answer, then bootstrapping")
    records = bootstrap(provider, here, nodes, req.ssh)
    store.set_nodes(ref.name, records)
    now = time.time()
    billed = {i.node_id for i in store.billing(ref.name) if i.uid == ref.uid and i.end is None}
    store.open_billing(
        [
            Interval(
                ref.name,
                ref.uid,
                provider.name,
                r.node_id,
                request.instance_type or "",
                region or "",
                price,
                now,
                None,
            )
            for r in records
            if r.node_id not in billed
        ]
    )
    store.set_status(ref.name, state.UP)
    store.event(
        ref.name,
        "up",
        f"{len(records)} node(s) up on {provider.name}"
        + (f" in {zone or region}" if region else ""),
    )
    rec = store.get_cluster(ref.name)
    assert rec is not None
    return rec


def _places(
    store: state.Store, provider: Provider, ref: ClusterRef, request: ProvisionRequest
) -> tuple[list[tuple[str | None, str | None]], str | None]:
    """(where to try, in order; the image a resumed `up` launched with). A resumed `up` tries
    the recorded region and zone first with the recorded image, so a launch the crash cut off
    is asked again with the same parameters, hence the same ClientToken, and made once."""
    if ref.region is None:  # nothing was placed yet
        return provider.placements(request), None
    rec = store.get_cluster(ref.name)
    recorded = rec.spec if rec else {}
    places = provider.placements(replace(request, region=ref.region))
    zone = recorded.get("zone")
    if zone:
        places = [(ref.region, zone)] + [p for p in places if p != (ref.region, zone)]
    return places, recorded.get("image")


def _recorded(spec: TaskSpec, req: ProvisionRequest) -> dict:
    """The spec as state keeps it: with the place, and the image and login user the provider
    chose, which later commands (and a resumed `up`) must use."""
    d = spec.to_dict()
    d.update(region=req.region, zone=req.zone, image=req.image)
    d["ssh"] = {**d["ssh"], "user": req.ssh.user}
    return d


def _refused(refusals: list[CapacityError | QuotaError], what: str) -> ProviderError:
    """Every place refused: exit 4 when quota was all that stood in the way, else 3."""
    full = [e.zone for e in refusals if isinstance(e, CapacityError)]
    quota = [e for e in refusals if isinstance(e, QuotaError)]
    if quota and not full:
        return QuotaError(
            quota[-1].scope,
            f"over quota for {what} in {', '.join(e.scope for e in quota)}: {quota[-1]}",
        )
    also = f"; over quota in {', '.join(e.scope for e in quota)}" if quota else ""
    return CapacityError(
        full[-1] if full else "",
        f"no capacity for {what} in {', '.join(full) or 'any place tried'}{also}; "
        "try another instance type or region",
    )


def bootstrap(
    provider: Provider, ref: ClusterRef, nodes: list[Node], ssh: SshOptions
) -> list[state.NodeRecord]:
    """Make each node's directories, install the node controller and detect the GPUs, in one
    round trip per node, waiting for a new machine's sshd; a root under ~/ is resolved."""
    from mlcloud import templates

    ctl_source = templates.path("node_ctl.py").read_bytes()

    def one(i: int) -> state.NodeRecord:
        node = nodes[i]
        t = provider.transport(ref, node, f"node{i}", ssh)
        root = path_arg(node.root)
        cmd = (
            f"umask 077 && mkdir -p {root}/bin {root}/jobs {root}/workdir && chmod 700 {root} "
            f'&& cat > {root}/{CTL} && cd {root} && echo "ssh=${{SSH_CONNECTION:-}}" '
            f"&& pwd -P && {quote(t.python)} {CTL} gpus"
        )
        deadline = time.monotonic() + provider.boot_timeout
        try:
            while True:
                try:
                    result = t.run(cmd, stdin=ctl_source, timeout=120)
                    break
                except RemoteError as e:
                    # a new instance: sshd not up yet, or up before cloud-init installed the key
                    booting = isinstance(e, UnreachableError) or "authentication refused" in str(e)
                    if not booting or time.monotonic() > deadline:
                        raise
                    time.sleep(2)
        finally:
            t.close()
        lines = check(result, t, "bootstrapping the node").stdout.strip().splitlines()
        seen_as, real_root, gpus = lines[-3][4:].split(), lines[-2], json.loads(lines[-1])
        # The address the node itself holds (the server side of SSH_CONNECTION) is the one its
        # peers reach for rendezvous; the provider's view can differ (NAT, proxies).
        private_ip = seen_as[2] if len(seen_as) == 4 else node.private_ip
        return state.NodeRecord(
            i,
            node.node_id,
            node.ip,
            private_ip,
            real_root,
            gpus["count"],
            gpus["model"],
            node.status,
        )

    return fan_out(one, list(range(len(nodes))))


def _rollback(
    store: state.Store, provider: Provider, ref: ClusterRef, report: Reporter, cause: BaseException
) -> None:
    """A failed first `up` leaves nothing running and nothing billing."""
    what = "interrupted" if isinstance(cause, KeyboardInterrupt) else "failed"
    report.warn(f"up {what}; removing what was created for {ref.name}")
    try:
        _teardown(store, provider, ref)
    except Exception as e:  # the original error matters more; state keeps the row for `down`
        store.set_status(ref.name, state.STOPPING)
        report.warn(
            f"cleanup after the failure did not finish ({e}); "
            f"run `mlcloud down {ref.name}` to retry it"
        )


def down(store: state.Store, name: str, report: Reporter, purge: bool = False) -> bool:
    """Terminate everything of the cluster, confirm, then drop its state. False if unknown.

    With purge, a teardown the provider cannot confirm (a host gone for good) still drops the
    cluster from state, after saying what may be left behind."""
    check_cluster_name(name)
    with cluster_lock(name):
        rec = store.get_cluster(name)
        if rec is None:
            return False
        store.set_status(name, state.STOPPING)
        provider = providers.get(rec.provider)
        report.step(f"tearing down {name} ({len(rec.nodes)} node(s) on {rec.provider})")
        try:
            _teardown(store, provider, _ref(rec))
        except MlcloudError as e:
            if not purge:
                raise
            report.warn(f"{e}; --purge: forgetting {name} anyway, check what is left by hand")
            try:
                provider.cleanup(_ref(rec))
            except MlcloudError as cleanup_error:
                report.warn(f"cleanup: {cleanup_error}")
            store.close_billing(rec.uid, time.time())
            store.delete_cluster(name)
        return True


def _teardown(store: state.Store, provider: Provider, ref: ClusterRef) -> None:
    live = provider.list(ref)
    if live:
        provider.terminate(ref, live)
    left = provider.list(ref)
    if left:
        raise MlcloudError(
            f"{len(left)} node(s) of {ref.name} are still not terminated "
            f"({', '.join(n.node_id for n in left)}); run `mlcloud down {ref.name}` again"
        )
    provider.cleanup(ref)
    store.close_billing(ref.uid, time.time())
    for job in store.jobs(ref.name, ref.uid):
        if job.status not in state.JOB_DONE:
            store.update_job(ref.name, ref.uid, job.job_id, status=state.JOB_CANCELLED)
    store.delete_cluster(ref.name)


def owner() -> str:
    """Who made a cluster: this home's id, so `gc` never takes another home's clusters for
    orphans, even those of another CI runner under the same OS user."""
    from mlcloud import paths

    return paths.home_id()


def workdir_of(spec: TaskSpec) -> Path:
    return Path(spec.workdir) if spec.workdir else Path.cwd()
