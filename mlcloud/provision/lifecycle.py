"""Cluster lifecycle: up (intent row, create, bootstrap) and down (terminate, confirm, drop)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from mlcloud import providers, state
from mlcloud.errors import MlcloudError, UsageError
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
    StorageAccess,
)
from mlcloud.provision import bootstrap
from mlcloud.provision.handle import Handle, owner, provider_node, ref_of, ssh_options
from mlcloud.remote import keys
from mlcloud.remote.shell import node_number, stop_input, stop_line
from mlcloud.remote.transport import (
    RemoteError,
)
from mlcloud.report import Reporter
from mlcloud.spec.cost import Interval
from mlcloud.spec.task import TaskSpec, check_cluster_name
from mlcloud.state import cluster_lock


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
        project=spec.gce.project,
        api_endpoint=spec.gce.api_endpoint,
        storage=StorageAccess(
            read=spec.storage.data,
            write=tuple(filter(None, [spec.storage.checkpoints_for(spec.provider or "")])),
        ),
    )


def up(
    store: state.Store,
    name: str,
    spec: TaskSpec,
    report: Reporter,
    price: float = 0.0,
    fallback_regions: tuple[str, ...] = (),
    cancelled: Callable[[], bool] | None = None,
) -> state.ClusterRecord:
    """Bring a cluster to UP; re-running after a crash reuses what the provider already has.
    Once `cancelled()` is true (a managed job cancelled while its cluster is made) it stops
    placing and bootstrapping and raises Cancelled, rolled back like any failure."""
    check_cluster_name(name)
    provider = providers.get(spec.provider)
    if spec.spot and not provider.capabilities.spot:
        raise UsageError(
            f"spot: the {provider.name} provider has no spot nodes; drop spot (--on-demand) "
            "or pick a cloud provider (--provider aws)"
        )
    provider.check(request_for(spec, spec.node_count))
    with cluster_lock(name, on_wait=report.info):
        existing = store.get_cluster(name)
        if existing is not None:
            if existing.provider != provider.name:
                raise UsageError(
                    f"cluster {name!r} already exists on provider {existing.provider!r}; "
                    f"pick another name or `mlcloud down {name}` first"
                )
            if existing.status == state.UP:
                low = spec.min_nodes or spec.node_count  # elastic: any size in MIN..MAX
                if not low <= len(existing.nodes) <= spec.node_count:
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
            ref = ref_of(existing)
            report.info(f"resuming the provisioning of {name} (found in state as INIT)")
        else:
            ref = ClusterRef(name, f"{name}-{secrets.token_hex(4)}", owner(store))
            store.create_cluster(name, ref.uid, provider.name, spec.to_dict(), ref.owner)
        attempt = Attempt()
        try:
            return _provision(
                store,
                provider,
                ref,
                spec,
                report,
                price,
                fallback_regions,
                attempt,
                resumed=existing is not None,
                cancelled=cancelled,
            )
        except BaseException as e:
            if existing is None:
                rec = store.get_cluster(name)
                _rollback(store, provider, ref_of(rec) if rec else ref, report, e, attempt)
            raise


@dataclass
class Attempt:
    """How far a first `up` got: whether it ever asked the provider for nodes. One that never
    did has nothing billing to lose track of, so its row can go even if cleanup fails."""

    created: bool = False


def _provision(
    store: state.Store,
    provider: Provider,
    ref: ClusterRef,
    spec: TaskSpec,
    report: Reporter,
    price: float,
    fallback_regions: tuple[str, ...] = (),
    attempt: Attempt | None = None,
    resumed: bool = False,
    cancelled: Callable[[], bool] | None = None,
) -> state.ClusterRecord:
    """Create what is missing through the placement path (`_place`), bootstrap, record."""
    want = spec.node_count
    request = replace(request_for(spec, want), fallback_regions=fallback_regions)
    places, resumed_image = _places(store, provider, ref, request)
    # the budget's deadline: the node agents enforce it, and a cloud that ends VMs itself
    # (capabilities.self_deadline: GCE maxRunDuration) is told it at create
    due = bootstrap.deadline(spec.autoscale.max_cost, price * want, time.time())
    own_deadline = due if provider.capabilities.self_deadline else None

    def ready(here: ClusterRef, req: ProvisionRequest) -> tuple[ProvisionRequest, list[Node]]:
        region, zone = here.region, req.zone
        image = request.image or (resumed_image if region == ref.region else None)
        req = replace(req, image=image, deadline=own_deadline)
        # recorded before anything is made there, so `down` and a re-run find it
        store.set_spec(ref.name, {**spec.to_dict(), "region": region, "zone": zone})
        report.step(
            f"preparing {provider.name} resources for {ref.name}"
            + (f" in {zone or region}" if region else "")
        )
        prepared = provider.prepare(here, req)
        for warning in prepared.warnings:
            report.warn(warning)
        store.set_spec(ref.name, _recorded(spec, prepared.request))  # for later commands
        return prepared.request, provider.list(here)  # a resumed `up` finds what it made

    placed = _place(
        store, provider, ref, request, places, report, ready, attempt=attempt, cancelled=cancelled
    )
    here, req = placed.ref, placed.request
    nodes = placed.there + placed.made
    try:
        if len(nodes) > want:
            terminate(provider, here, nodes[want:], store.get_cluster(ref.name))
            nodes = nodes[:want]
        report.step(f"waiting for {len(nodes)} node(s) to answer, then bootstrapping")
        records = bootstrap.bootstrap(
            provider, here, nodes, req.ssh, spec.autoscale, due, spec.spot, cancelled=cancelled
        )
        _check(cancelled, ref.name)
    except (Exception, KeyboardInterrupt):
        if resumed:  # a first `up` is rolled back whole (`_rollback`)
            # only what this attempt made: what an earlier one made waits for the next run
            made = placed.made
            _undo(store, provider, here, req.first_number, len(made), report, made=made)
        raise
    store.set_nodes(ref.name, records)
    _bill(
        store, provider.name, here, [r.node_id for r in records], request.instance_type or "", price
    )
    store.set_status(ref.name, state.UP)
    where = placed.zone or here.region
    store.event(
        ref.name,
        "up",
        f"{len(records)} node(s) up on {provider.name}" + (f" in {where}" if where else ""),
    )
    rec = store.get_cluster(ref.name)
    assert rec is not None
    return rec


@dataclass(frozen=True)
class Placed:
    """Where one attempt of the placement path got its nodes."""

    ref: ClusterRef  # the cluster, with the region chosen
    zone: str | None
    request: ProvisionRequest  # as the provider served it (zone, image, login, first number)
    there: list[Node]  # the cluster's nodes found there before (a resumed `up`)
    made: list[Node]  # what this attempt made


def _place(
    store: state.Store,
    provider: Provider,
    ref: ClusterRef,
    request: ProvisionRequest,
    places: list[tuple[str | None, str | None]],
    report: Reporter,
    ready: Callable[[ClusterRef, ProvisionRequest], tuple[ProvisionRequest, list[Node]]],
    first: int | None = None,
    cancelled: Callable[[], bool] | None = None,
    attempt: Attempt | None = None,
) -> Placed:
    """The one placement path of `up` and `add_nodes`: each place in turn, zones then
    regions, until one makes `request.count` nodes less those already there. A CapacityError
    moves on to the next place, a QuotaError to the next region (quotas are regional); a
    region left with none of the cluster's nodes loses its cluster-wide resources. Every
    attempt that fails, refused or not, terminates what it made (`_undo`) before moving on.

    ready(here, request) prepares a place: (the request as the provider will serve it, the
    cluster's nodes there). first: the first number of `request.count` nodes more, reserved by
    the caller (`add_nodes`); without it (`up`), the nodes there count toward the request and
    the rest are numbered one past what the cluster has and ever had, so a resumed `up` asks
    again with the same numbers (EC2: the same ClientToken) and is served once."""
    refusals: list[CapacityError | QuotaError] = []
    over_quota: set[str | None] = set()
    for n, (region, zone) in enumerate(places):
        if region in over_quota:
            continue
        _check(cancelled, ref.name)
        here = replace(ref, region=region)
        req, there = ready(here, replace(request, region=region, zone=zone))
        count = request.count if first is not None else request.count - len(there)
        if count <= 0:
            return Placed(here, zone, req, there, [])
        number = first if first is not None else store.number_nodes(ref.name, 0, next_number(there))
        req = replace(req, first_number=number)
        report.step(f"creating {count} node(s)" + (f" in {zone}" if zone else ""))
        if attempt is not None:
            attempt.created = True
        try:
            made = provider.create(here, req, count)
            if len(made) < count:  # all or nothing: fewer is a refusal, undone below
                raise CapacityError(zone or "", f"{count} node(s) asked, {len(made)} made")
            if first is None:
                store.number_nodes(ref.name, 0, number + count)  # none of these again
        except (CapacityError, QuotaError) as e:
            _undo(store, provider, here, req.first_number, count, report, there=there, refused=True)
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
        except (Exception, KeyboardInterrupt):
            _undo(store, provider, here, req.first_number, count, report, there=there)
            raise
        return Placed(here, zone, req, there, made)
    more = " more" if first is not None else ""
    raise _refused(refusals, f"{request.count}{more} x {request.instance_type or 'node'}")


def _undo(
    store: state.Store,
    provider: Provider,
    here: ClusterRef,
    first: int,
    count: int,
    report: Reporter,
    made: list[Node] | None = None,
    there: list[Node] | None = None,
    refused: bool = False,
) -> None:
    """Terminate what one failed attempt made, never a node that was there before it: `made`
    when create returned them, else what the provider lists now that `there` (its listing
    before the attempt) lacked. Unless the place refused outright and made nothing, the
    attempt's node numbers are never given again, so a later attempt is a new one (EC2: a new
    ClientToken, not the terminated instances handed back). A failure here is said, not
    raised: the attempt's own failure is the one that matters, and `down` finds what is left
    by tag."""
    try:
        if made is None:
            before = {n.node_id for n in there or []}
            made = [n for n in provider.list(here) if n.node_id not in before]
        if refused and not made:
            return
        if made:
            report.warn(
                f"terminating the {len(made)} node(s) this attempt made "
                f"({', '.join(n.node_id for n in made)})"
            )
            terminate(provider, here, made, store.get_cluster(here.name))
    except Exception as e:  # noqa: BLE001 (said; the attempt's failure is raised)
        report.warn(
            f"what this attempt made could not be listed or terminated ({e}); "
            f"`mlcloud down {here.name}` terminates by tag whatever is left"
        )
    if store.get_cluster(here.name) is not None:  # gone: `down` came, nothing to number
        store.number_nodes(here.name, 0, first + count)


def _bill(
    store: state.Store,
    provider: str,
    ref: ClusterRef,
    node_ids: list[str],
    instance_type: str,
    price: float,
    start: float | None = None,
) -> None:
    """Open a billing interval, from `start` (default: now), for each node that has none
    open."""
    start = time.time() if start is None else start
    billed = {i.node_id for i in store.billing(ref.name) if i.uid == ref.uid and i.end is None}
    store.open_billing(
        [
            Interval(
                ref.name,
                ref.uid,
                provider,
                node_id,
                instance_type,
                ref.region or "",
                price,
                start,
                None,
            )
            for node_id in node_ids
            if node_id not in billed
        ]
    )


class Cancelled(MlcloudError):
    """The cluster went down (or was made again) while nodes were being made for it."""


@dataclass(frozen=True)
class NewNodes:
    """Nodes made and bootstrapped for a cluster that is up, not recorded yet: the caller
    records them (`keep`, with the nodes' places in state) or, finding the cluster going
    down, `discard`s them."""

    records: list[state.NodeRecord]
    nodes: list[Node]  # as the provider made them
    ref: ClusterRef  # the cluster, where they were made
    instance_type: str
    price: float
    made: float  # when the provider made them: their billing starts there


def add_nodes(
    store: state.Store,
    h: Handle,
    count: int,
    report: Reporter,
    cancelled: Callable[[], bool] | None = None,
) -> NewNodes:
    """New nodes for a cluster that is up (a lost node's replacement, growth): made where the
    cluster is first (same zone, then the others; on ssh, the spare hosts), then bootstrapped
    as `up` does. No lock is held meanwhile (a bootstrap takes minutes) and nothing of them is
    recorded but their numbers: the caller places them (`keep`). What was made and then failed
    to bootstrap, or made while `cancelled()` turned true (the cluster is going down), is
    terminated here, and Cancelled or the failure raised."""
    # state keeps the job's environment by name only: not needed to make nodes
    spec = TaskSpec.from_dict({**h.record.spec, "envs": {}})
    # the recorded zone is where `up` placed the cluster: tried first (`_places`), then the
    # region's other zones, as `up` would have
    request = replace(request_for(spec, count), image=h.record.spec.get("image"), zone=None)
    request = replace(request, ssh=ssh_options(h.record.spec))
    billing = [i for i in store.billing(h.record.name) if i.uid == h.ref.uid]
    price = billing[-1].price if billing else 0.0
    # the new agents (and clouds that end VMs themselves) get the cluster's rules, and a
    # deadline for what is left of the budget at the rate after this resize
    due = bootstrap.budget_deadline(
        spec.autoscale.max_cost, billing, time.time(), joining=price * count
    )
    request = replace(request, deadline=due if h.provider.capabilities.self_deadline else None)
    # numbers never used by the cluster before, not even by a node since gone
    floor = next_number([*map(provider_node, h.nodes), *h.provider.list(h.ref)])
    first = store.number_nodes(h.record.name, count, floor)
    places, _ = _places(store, h.provider, h.ref, request)

    def ready(here: ClusterRef, req: ProvisionRequest) -> tuple[ProvisionRequest, list[Node]]:
        return h.provider.prepare(here, req).request, h.provider.list(here)

    placed = _place(
        store, h.provider, h.ref, request, places, report, ready, first=first, cancelled=cancelled
    )
    here, req, nodes = placed.ref, placed.request, placed.made
    where = placed.zone or here.region
    store.event(
        h.record.name,
        "placed",
        f"{', '.join(n.node_id for n in nodes)} made" + (f" in {where}" if where else ""),
    )
    new = NewNodes([], nodes, here, request.instance_type or "", price, time.time())
    try:
        _check(cancelled, h.record.name)
        report.step(f"bootstrapping {len(nodes)} new node(s)")
        records = bootstrap.bootstrap(
            h.provider, here, nodes, req.ssh, spec.autoscale, due, spec.spot, cancelled=cancelled
        )
        _check(cancelled, h.record.name)
    except BaseException:
        try:
            discard(store, h.provider, h.record, new)
        except Exception as e:  # noqa: BLE001 (said; the first failure is the one raised)
            report.warn(
                f"the new node(s) {', '.join(n.node_id for n in nodes)} could not be "
                f"terminated ({e}); `mlcloud down {h.record.name}` terminates them by tag"
            )
        raise
    return replace(new, records=records)


def _check(cancelled: Callable[[], bool] | None, name: str) -> None:
    if cancelled is not None and cancelled():
        raise Cancelled(f"cluster {name} is going down: no node is added")


def keep(store: state.Store, provider: Provider, new: NewNodes) -> None:
    """New nodes recorded (the caller set them in state, under the cluster lock): billed
    from when they were made."""
    _bill(
        store,
        provider.name,
        new.ref,
        [n.node_id for n in new.nodes],
        new.instance_type,
        new.price,
        new.made,
    )


def discard(
    store: state.Store, provider: Provider, rec: state.ClusterRecord, new: NewNodes
) -> None:
    """New nodes not kept (their bootstrap failed, or the cluster went down meanwhile):
    terminated, and never part of the cluster, so they get no billing row (a cluster's
    billing lists the nodes it ran on). Once the cluster is gone from state (`down` finished
    first), what it held cluster-wide goes too, as `down` would have removed it had these
    nodes been there to see. rec: the cluster as it was when they were made (its login
    settings, for stopping their processes)."""
    terminate(provider, new.ref, new.nodes, rec)
    now_rec = store.get_cluster(new.ref.name)
    if (now_rec is None or now_rec.uid != new.ref.uid) and not provider.list(new.ref):
        provider.cleanup(new.ref)
        keys.delete_cluster_key(new.ref.uid)


def next_number(nodes: list[Node]) -> int:
    """One past the highest number among these nodes' roots (`node-K`), 0 for none."""
    return 1 + max((k for k in (node_number(n.root) for n in nodes) if k is not None), default=-1)


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


def _rollback(
    store: state.Store,
    provider: Provider,
    ref: ClusterRef,
    report: Reporter,
    cause: BaseException,
    attempt: Attempt,
) -> None:
    """A failed first `up` leaves nothing running and nothing billing, and nothing stuck: if it
    never asked for nodes and cleanup fails too (the same bad credentials, say), the row goes
    anyway; what cluster-wide resources may remain carry its tags for `mlcloud gc`."""
    what = "interrupted" if isinstance(cause, KeyboardInterrupt) else "failed"
    report.warn(f"up {what}; removing what was created for {ref.name}")
    try:
        _teardown(store, provider, ref)
    except Exception as e:  # the original error matters more
        if not attempt.created:
            store.close_billing(ref.uid, time.time())
            store.delete_cluster(ref.name)
            report.warn(
                f"cleanup after the failure did not finish ({e}); no node was asked for, so "
                f"{ref.name} is forgotten: `mlcloud gc` finds any tagged resource left"
            )
            return
        store.set_status(ref.name, state.STOPPING)  # nodes may exist: state keeps the row
        report.warn(
            f"cleanup after the failure did not finish ({e}); "
            f"run `mlcloud down {ref.name}` to retry it"
        )


@dataclass(frozen=True)
class TornDown:
    """What `down` took away: the cluster and the nodes it held."""

    name: str
    uid: str
    provider: str
    nodes: tuple[str, ...]
    unconfirmed: str | None = None  # with purge: why the teardown could not be confirmed


def down(store: state.Store, name: str, report: Reporter, purge: bool = False) -> TornDown | None:
    """Terminate everything of the cluster, confirm, then drop its state. None if unknown.

    With purge, the cluster is dropped from state whatever the teardown raised (a host gone
    for good, an unreadable provider file), after saying what may be left behind."""
    check_cluster_name(name)
    with cluster_lock(name, on_wait=report.info):
        rec = store.get_cluster(name)
        if rec is None:
            return None
        store.set_status(name, state.STOPPING)
        report.step(f"tearing down {name} ({len(rec.nodes)} node(s) on {rec.provider})")
        gone = TornDown(name, rec.uid, rec.provider, tuple(n.node_id for n in rec.nodes))
        provider: Provider | None = None
        try:
            provider = providers.get(rec.provider)
            _teardown(store, provider, ref_of(rec))
        except Exception as e:
            if not purge:
                raise
            why = str(e) or type(e).__name__
            report.warn(f"{why}; --purge: forgetting {name} anyway, check what is left by hand")
            try:
                if provider is not None:
                    provider.cleanup(ref_of(rec))
            except Exception as cleanup_error:  # noqa: BLE001 (said, then forgotten)
                report.warn(f"cleanup: {cleanup_error or type(cleanup_error).__name__}")
            store.close_billing(rec.uid, time.time())
            store.delete_cluster(name)
            return replace(gone, unconfirmed=why)
        return gone


def terminate(
    provider: Provider, ref: ClusterRef, nodes: list[Node], rec: state.ClusterRecord | None
) -> None:
    """Have the provider terminate nodes, after stopping the cluster's processes on them where
    the machines are not mlcloud's (local, ssh): nothing powers those off, so nothing else
    would end what the cluster started there. rec (the cluster as state has it) gives the
    login settings and each node's interpreter."""
    stop_processes(provider, ref, nodes, rec)
    provider.terminate(ref, nodes)


def stop_processes(
    provider: Provider, ref: ClusterRef, nodes: list[Node], rec: state.ClusterRecord | None
) -> None:
    """End every process the cluster started on these nodes (jobs and agents, by tag), in
    parallel, where the provider does not own the machines. A node that cannot be reached is
    left to `terminate`, which must reach it too and says so (an ssh host stays claimed)."""
    if provider.capabilities.owns_machines or not nodes:
        return
    ssh = ssh_options(rec.spec) if rec else SshOptions()
    known = {n.node_id: n for n in rec.nodes} if rec else {}

    source = stop_input()

    def one(node: Node) -> None:
        seen = known.get(node.node_id)
        t = provider.transport(ref, node, f"node{seen.idx}" if seen else node.node_id, ssh)
        if seen and seen.python:
            t.python = seen.python
        try:
            t.run(stop_line(t.python, node.root, ref.uid), timeout=120, stdin=source)
        except RemoteError:
            pass
        finally:
            t.close()

    fan_out(one, nodes)


def _teardown(store: state.Store, provider: Provider, ref: ClusterRef) -> None:
    live = provider.list(ref)
    if live:
        terminate(provider, ref, live, store.get_cluster(ref.name))
    left = provider.list(ref)
    if left:
        raise MlcloudError(
            f"{len(left)} node(s) of {ref.name} are still not terminated "
            f"({', '.join(n.node_id for n in left)}); run `mlcloud down {ref.name}` again"
        )
    provider.cleanup(ref)
    keys.delete_cluster_key(ref.uid)  # the engine's, kept while `up` moved between regions
    store.close_billing(ref.uid, time.time())
    for job in store.jobs(ref.name, ref.uid):
        if job.status not in state.JOB_DONE:
            store.update_job(ref.name, ref.uid, job.job_id, status=state.JOB_CANCELLED)
    store.delete_cluster(ref.name)
