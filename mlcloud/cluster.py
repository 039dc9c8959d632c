"""Cluster lifecycle: up (intent row, create, bootstrap) and down (terminate, confirm, drop)."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlcloud import agentview, keys, providers, state
from mlcloud.cost import Interval
from mlcloud.errors import MlcloudError, NotFoundError, UsageError
from mlcloud.locks import cluster_lock
from mlcloud.names import check_cluster_name
from mlcloud.parallel import fan_out, pause
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
from mlcloud.remote.layout import CTL, node_number, stop_line
from mlcloud.remote.shell import path_arg, quote
from mlcloud.remote.transport import (
    LostError,
    RemoteError,
    Transport,
    UnreachableError,
    check,
)
from mlcloud.report import Reporter
from mlcloud.spec import AutoscaleSpec, TaskSpec


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
    ref = _ref(rec)
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
            write=(spec.storage.checkpoints,) if spec.storage.checkpoints else (),
        ),
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
    if spec.spot and not provider.capabilities.spot:
        raise UsageError(
            f"spot: the {provider.name} provider has no spot nodes; drop spot (--on-demand) "
            "or pick a cloud provider (--provider aws)"
        )
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
            ref = _ref(existing)
            report.info(f"resuming the provisioning of {name} (found in state as INIT)")
        else:
            ref = ClusterRef(name, f"{name}-{secrets.token_hex(4)}", owner())
            store.create_cluster(name, ref.uid, provider.name, spec.to_dict(), ref.owner)
        attempt = Attempt()
        try:
            return _provision(store, provider, ref, spec, report, price, fallback_regions, attempt)
        except BaseException as e:
            if existing is None:
                rec = store.get_cluster(name)
                _rollback(store, provider, _ref(rec) if rec else ref, report, e, attempt)
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
) -> state.ClusterRecord:
    """Create what is missing, failing over zone by zone on capacity, and region by region on
    capacity or quota (quotas are regional: a region over quota is left at once)."""
    want = spec.node_count
    request = replace(request_for(spec, want), fallback_regions=fallback_regions)
    places, resumed_image = _places(store, provider, ref, request)
    # the budget's deadline: the node agents enforce it, and a cloud that ends VMs itself
    # (capabilities.self_deadline: GCE maxRunDuration) is told it at create
    due = agentview.deadline(spec.autoscale.max_cost, price * want, time.time())
    own_deadline = due if provider.capabilities.self_deadline else None
    refusals: list[CapacityError | QuotaError] = []
    over_quota: set[str | None] = set()
    for n, (region, zone) in enumerate(places):
        if region in over_quota:
            continue
        here = replace(ref, region=region)
        image = request.image or (resumed_image if region == ref.region else None)
        req = replace(request, region=region, zone=zone, image=image, deadline=own_deadline)
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
                if attempt is not None:
                    attempt.created = True
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
        terminate(provider, here, nodes[want:], store.get_cluster(ref.name))
        nodes = nodes[:want]
    report.step(f"waiting for {len(nodes)} node(s) to answer, then bootstrapping")
    records = bootstrap(provider, here, nodes, req.ssh, spec.autoscale, due, spec.spot)
    store.set_nodes(ref.name, records)
    _bill(store, provider.name, here, records, request.instance_type or "", price)
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


def _bill(
    store: state.Store,
    provider: str,
    ref: ClusterRef,
    records: list[state.NodeRecord],
    instance_type: str,
    price: float,
) -> None:
    """Open a billing interval for each node that has none open."""
    now = time.time()
    billed = {i.node_id for i in store.billing(ref.name) if i.uid == ref.uid and i.end is None}
    store.open_billing(
        [
            Interval(
                ref.name,
                ref.uid,
                provider,
                r.node_id,
                instance_type,
                ref.region or "",
                price,
                now,
                None,
            )
            for r in records
            if r.node_id not in billed
        ]
    )


def add_nodes(
    store: state.Store, h: Handle, count: int, report: Reporter
) -> list[state.NodeRecord]:
    """New nodes for a cluster that is up (a lost node's replacement, growth): made where the
    cluster is first (same zone, then the others; on ssh, the spare hosts), then bootstrapped
    and billed as `up` does. Their idx continue after the cluster's; the caller places them."""
    # state keeps the job's environment by name only: not needed to make nodes
    spec = TaskSpec.from_dict({**h.record.spec, "envs": {}})
    request = replace(request_for(spec, count), image=h.record.spec.get("image"))
    request = replace(request, ssh=ssh_options(h.record.spec))
    billing = [i for i in store.billing(h.record.name) if i.uid == h.ref.uid]
    price = billing[-1].price if billing else 0.0
    # the new agents (and clouds that end VMs themselves) get the cluster's rules, and a
    # deadline for what is left of the budget at the rate after this resize
    due = agentview.budget_deadline(
        spec.autoscale.max_cost, billing, time.time(), joining=price * count
    )
    request = replace(request, deadline=due if h.provider.capabilities.self_deadline else None)
    places, _ = _places(store, h.provider, h.ref, request)
    refusals: list[CapacityError | QuotaError] = []
    for region, zone in places:
        here = replace(h.ref, region=region)
        try:
            req = h.provider.prepare(here, replace(request, region=region, zone=zone)).request
            nodes = h.provider.create(here, req, count)
        except (CapacityError, QuotaError) as e:
            refusals.append(e)
            store.event(h.record.name, "capacity", str(e))
            continue
        if nodes:
            break
        refusals.append(CapacityError(zone or "", "no spare host left"))
    else:
        raise _refused(refusals, f"{count} more x {request.instance_type or 'node'}")
    report.step(f"bootstrapping {len(nodes)} new node(s)")
    records = bootstrap(h.provider, here, nodes, req.ssh, spec.autoscale, due, spec.spot)
    start = max((n.idx for n in h.nodes), default=-1) + 1
    records = [replace(r, idx=start + k) for k, r in enumerate(records)]
    _bill(store, h.provider.name, here, records, request.instance_type or "", price)
    return records


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


# Where torch lives on the images users start from: the AWS Deep Learning AMIs keep it apart
# from the system python3, older GCE Deep Learning VMs in conda.
PYTHON_CANDIDATES = ("/opt/pytorch/bin/python", "/opt/conda/bin/python", "python3")
# How long a booting node's "authentication refused" is waited out (cloud-init installing the
# key): past that it is a wrong user or key, and the user hears it now, not at the boot timeout.
AUTH_WINDOW = 90.0
MARK = "@mlcloud:"  # bootstrap output lines carry it; anything else (a chatty ~/.bashrc) is noise


def bootstrap(
    provider: Provider,
    ref: ClusterRef,
    nodes: list[Node],
    ssh: SshOptions,
    autoscale: AutoscaleSpec | None = None,
    due: float | None = None,
    spot: bool = False,
) -> list[state.NodeRecord]:
    """Make each node's directories, install the node controller and the node agent (its
    config: autoscale's rules and the budget deadline `due`), find the Python that has torch,
    detect the GPUs and start the agent with that Python, in one round trip per node, waiting
    for a new machine's sshd; a root under ~/ is resolved."""
    from mlcloud import templates

    ctl_source = templates.path("node_ctl.py").read_bytes()
    agent_source = templates.path("agent.py").read_bytes()
    auto = autoscale or AutoscaleSpec()

    def one(i: int) -> state.NodeRecord:
        node = nodes[i]
        t = provider.transport(ref, node, f"node{i}", ssh)
        # ssh.python is the user's word; the local provider's nodes are this machine
        pythons = (
            (ssh.python,)
            if ssh.python
            else (t.python,)
            if provider.name == "local"
            else PYTHON_CANDIDATES
        )
        conf = agentview.config(
            auto,
            provider.name,
            ref.uid,
            i,
            node.node_id,
            spot,
            due,
            provider.capabilities.owns_machines,
            node_number(node.root),  # as launch tags the node's jobs: a spare keeps its own
        )
        cmd = _bootstrap_script(node.root, pythons, (len(ctl_source), len(agent_source)))
        deadline = time.monotonic() + provider.boot_timeout
        refused_since: float | None = None
        try:
            while True:
                try:
                    stdin = ctl_source + agent_source + json.dumps(conf).encode()
                    result = t.run(cmd, stdin=stdin, timeout=120)
                    break
                except RemoteError as e:
                    # a new instance: sshd not up yet, up before cloud-init installed the key,
                    # or dropping connections while it starts
                    now = time.monotonic()
                    refused = "authentication refused" in str(e)
                    if refused and refused_since is None:
                        refused_since = now
                    booting = isinstance(e, (UnreachableError, LostError)) or (
                        # the key lands seconds after sshd answers; a wrong user never does
                        refused and now - (refused_since or now) < AUTH_WINDOW
                    )
                    if not booting or now > deadline:
                        raise
                    pause(2)  # an interrupted `up` ends this wait at once
        finally:
            t.close()
        check(result, t, "bootstrapping the node")
        found = _markers(result.stdout)
        where = f"node{i} ({node.ip})"
        if not {"ssh", "root", "python"} <= found.keys():
            noise = next((x for x in result.stdout.splitlines() if x.strip()), "nothing")
            raise RemoteError(
                f"{where}: bootstrap output not understood (first line: {noise[:80]!r}); "
                "check that the login shell runs commands as given"
            )
        if not found["python"]:
            raise RemoteError(
                f"{where}: no Python with torch found (tried {', '.join(pythons)}); set "
                "ssh.python in the spec to the interpreter that has torch"
            )
        try:
            gpus = json.loads(found.get("gpus", ""))
        except ValueError:
            raise RemoteError(f"{where}: the GPU probe printed {found.get('gpus')!r}") from None
        seen_as = found["ssh"].split()
        # The address the node itself holds (the server side of SSH_CONNECTION) is the one its
        # peers reach for rendezvous; the provider's view can differ (NAT, proxies).
        private_ip = seen_as[2] if len(seen_as) == 4 else node.private_ip
        return state.NodeRecord(
            i,
            node.node_id,
            node.ip,
            private_ip,
            found["root"],
            gpus["count"],
            gpus["model"],
            node.status,
            found["python"],
        )

    return fan_out(one, list(range(len(nodes))))


def _bootstrap_script(root_path: str, pythons: tuple[str, ...], sizes: tuple[int, int]) -> str:
    """The one command bootstrap runs; stdin holds node_ctl.py, agent.py (of the given sizes)
    and the agent's config. It reports in MARK lines."""
    root = path_arg(root_path)
    agent_dir = f"{root}/{agentview.DIR}"
    # torch is looked up, not imported: an import takes seconds, and on a fresh cloud volume
    # (blocks fetched lazily from a snapshot) tens of seconds per interpreter tried
    has_torch = quote("import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)")
    return (
        f"umask 077 && mkdir -p {root}/bin {root}/jobs {root}/workdir {agent_dir} "
        f"&& chmod 700 {root} && head -c {sizes[0]} > {root}/{CTL} "
        f"&& head -c {sizes[1]} > {root}/{agentview.AGENT} "
        f"&& cat > {agent_dir}/config.json && cd {root} || exit 1\n"
        f'echo "{MARK}ssh=${{SSH_CONNECTION:-}}"\n'
        f'echo "{MARK}root=$(pwd -P)"\n'
        f"for c in {' '.join(quote(p) for p in pythons)}; do\n"
        f'  p=$(command -v "$c") || continue\n'
        f'  "$p" -c {has_torch} </dev/null >/dev/null 2>&1 || continue\n'
        f'  echo "{MARK}python=$p"\n'
        f'  g=$("$p" {CTL} gpus) || exit 1\n'
        f'  echo "{MARK}gpus=$g"\n'
        f'  echo "{MARK}agent=$("$p" {agentview.AGENT} start "$(pwd -P)")"\n'
        f"  exit 0\n"
        f"done\n"
        f'echo "{MARK}python="\n'
    )


def _markers(stdout: str) -> dict[str, str]:
    """KEY=VALUE from the lines that start with MARK (the last one of a key wins)."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith(MARK):
            key, _, value = line[len(MARK) :].partition("=")
            found[key] = value.strip()
    return found


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
    with cluster_lock(name):
        rec = store.get_cluster(name)
        if rec is None:
            return None
        store.set_status(name, state.STOPPING)
        report.step(f"tearing down {name} ({len(rec.nodes)} node(s) on {rec.provider})")
        gone = TornDown(name, rec.uid, rec.provider, tuple(n.node_id for n in rec.nodes))
        provider: Provider | None = None
        try:
            provider = providers.get(rec.provider)
            _teardown(store, provider, _ref(rec))
        except Exception as e:
            if not purge:
                raise
            why = str(e) or type(e).__name__
            report.warn(f"{why}; --purge: forgetting {name} anyway, check what is left by hand")
            try:
                if provider is not None:
                    provider.cleanup(_ref(rec))
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

    def one(node: Node) -> None:
        seen = known.get(node.node_id)
        t = provider.transport(ref, node, f"node{seen.idx}" if seen else node.node_id, ssh)
        if seen and seen.python:
            t.python = seen.python
        try:
            t.run(stop_line(t.python, node.root, ref.uid), timeout=120)
        except RemoteError:
            pass
        finally:
            t.close()

    fan_out(one, nodes)


STOP_GRACE = 10.0  # a rule's stop: SIGTERM to SIGKILL on each node (the job checkpointed before)


def stop_by_rule(store: state.Store, h: Handle, kind: str, reason: str, report: Reporter) -> None:
    """A rule (idle, budget) ends the cluster, from the controller as the node agents end it
    themselves: machines mlcloud owns are terminated (`down`); elsewhere (local, ssh) each
    node's agent stop runs, which ends the cluster's processes and writes the stop record and
    the event where `status` and `events` read them, and the nodes are marked stopped. Their
    directories (checkpoints, events) stay until `down`."""
    if h.provider.capabilities.owns_machines:
        down(store, h.record.name, report)
        return
    line = f"{agentview.AGENT} stop . {quote(kind)} {quote(reason)} {STOP_GRACE}"

    def one(i: int) -> None:
        t = h.transports[i]
        try:
            r = t.run(
                f"cd {path_arg(h.nodes[i].root)} && {quote(t.python)} {line}",
                timeout=STOP_GRACE + 60,
            )
            check(r, t, "stopping the node")
        except RemoteError as e:  # a node lost meanwhile: status shows it as last seen
            report.warn(str(e))

    fan_out(one, list(range(len(h.nodes))))
    from mlcloud import nodeevents

    nodeevents.gather(store, h.record)


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


def owner() -> str:
    """Who made a cluster: this home's id, so `gc` never takes another home's clusters for
    orphans, even those of another CI runner under the same OS user."""
    from mlcloud import paths

    return paths.home_id()


def workdir_of(spec: TaskSpec) -> Path:
    return Path(spec.workdir) if spec.workdir else Path.cwd()
