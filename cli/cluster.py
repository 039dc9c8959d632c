"""`up`, `down`, `status`: the cluster's lifecycle."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import typer
from mlcloud.cli import options, output


def load(file: Path | None, ssh: dict | None = None, **overrides):
    """The spec from -f (if any) with command-line flags laid over it."""
    from mlcloud.errors import UsageError
    from mlcloud.spec import TaskSpec, load_spec

    spec = load_spec(file) if file else TaskSpec()
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "nodes" in changes and changes["nodes"] < 1:
        raise UsageError(f"--nodes: must be 1 or more, got {changes['nodes']}")
    ssh_changes = {k: v for k, v in (ssh or {}).items() if v is not None}
    if ssh_changes.get("port") is not None and not 0 < ssh_changes["port"] < 65536:
        raise UsageError(f"--ssh-port: {ssh_changes['port']} is not a TCP port (1-65535)")
    if ssh_changes:
        changes["ssh"] = replace(spec.ssh, **ssh_changes)
    return replace(spec, **changes)


def cluster_name(name: str | None, spec_name: str | None) -> str:
    from mlcloud.errors import UsageError
    from mlcloud.names import check_cluster_name

    chosen = name or spec_name
    if not chosen:
        raise UsageError("name the cluster: `mlcloud up NAME` or `name:` in the spec file")
    return check_cluster_name(chosen)


def up(
    name: str | None = typer.Argument(None, help="Cluster name (default: the spec's name)."),
    file: Path | None = options.SPEC_FILE,
    provider: str | None = typer.Option(
        None, "--provider", "-p", help="Where the nodes run (default: local)."
    ),
    nodes: int | None = typer.Option(None, "--nodes", "-n", help="Number of nodes."),
    hosts: str | None = typer.Option(
        None, "--hosts", help="ssh provider: user@h1[:port],user@h2 (one node per host)."
    ),
    identity: Path | None = options.IDENTITY,
    ssh_user: str | None = options.SSH_USER,
    ssh_port: int | None = options.SSH_PORT,
    proxy_command: str | None = options.PROXY_COMMAND,
    allow_ssh_from: list[str] | None = typer.Option(
        None,
        "--allow-ssh-from",
        help="Clouds: CIDR allowed to reach SSH (repeatable; default: this machine's address).",
    ),
    instance_type: str | None = typer.Option(None, "--instance-type", help="e.g. g5.xlarge"),
    region: str | None = typer.Option(None, "--region", help="Cloud region."),
    zone: str | None = typer.Option(None, "--zone", help="Zone (default: any with capacity)."),
    spot: bool | None = typer.Option(None, "--spot/--on-demand", help="Spot instances."),
    image: str | None = typer.Option(None, "--image", help="Machine image (default: DLAMI)."),
    gpus: str | None = typer.Option(
        None, "--gpus", help="GPUs per node, e.g. A100:8: the cheapest matching offer is picked."
    ),
    max_hours: float | None = typer.Option(
        None, "--max-hours", min=0.0, help="Show the plan's cost for this many hours."
    ),
    near: str | None = typer.Option(
        None,
        "--near",
        help="Where the data is (REGION, s3://bucket, gs://bucket): compute goes there when "
        "it can, else the egress estimate is shown.",
    ),
    yes: bool = options.YES,
    json: bool = options.JSON,
) -> None:
    """Create a cluster, or finish creating one that an earlier `up` left half made."""
    from mlcloud import cluster, state, views
    from mlcloud import plan as planner
    from mlcloud.locality import locate
    from mlcloud.spec import check_cidr

    host_list = tuple(h.strip() for h in hosts.split(",") if h.strip()) if hosts else None
    spec = load(
        file,
        ssh={
            "identity_file": str(identity.expanduser().resolve()) if identity else None,
            "user": ssh_user,
            "port": ssh_port,
            "proxy_command": proxy_command,
            "allowed_cidrs": tuple(check_cidr(c) for c in allow_ssh_from)
            if allow_ssh_from
            else None,
        },
        provider=provider or ("ssh" if host_list else None),
        nodes=nodes,
        hosts=host_list,
        region=region,
        zone=zone,
        spot=spot,
        image=image,
    )
    if instance_type:
        spec = replace(spec, resources=replace(spec.resources, instance_type=instance_type))
    if gpus:
        from mlcloud.spec import parse_gpus

        spec = replace(spec, resources=replace(spec.resources, gpus=parse_gpus(gpus)))
    name = cluster_name(name, spec.name)
    store = state.open_store()
    existing = store.get_cluster(name)
    data = locate(near) if near else None
    spec, plan = planner.make(spec, _default_region, max_hours, data)
    if not json and existing is None and plan.provider not in planner.LOCAL_PROVIDERS:
        _show_plan(plan)
    if existing is None and plan.per_hour != 0:
        what = "an unpriced" if plan.per_hour is None else f"${plan.per_hour:.2f}/h"
        output.confirm(f"launch {plan.nodes} x {plan.instance_type} ({what})?", yes)
    rep = output.reporter(quiet=json)
    try:
        rec = cluster.up(
            store,
            name,
            spec,
            rep,
            price=plan.price_per_node or 0.0,
            fallback_regions=plan.fallback_regions,
        )
    finally:
        output.close(rep)
    if json:
        output.print_json(
            {**views.cluster_json(rec, store.jobs(name, rec.uid)), "plan": plan.to_dict()}
        )
    else:
        _show_nodes(rec)
        print(
            f"cluster {name} is up: `mlcloud train {name} SCRIPT.py` to run a job, "
            f"`mlcloud down {name}` when done"
        )


def _default_region(provider: str) -> str | None:
    from mlcloud import providers

    p = providers.get(provider)
    return p.region() if hasattr(p, "region") else None


def _show_plan(plan) -> None:
    def money(v):
        return "-" if v is None else f"${v:,.2f}"

    columns = ["provider", "region", "type", "gpus", "nodes", "$/h per node", "$/h total"]
    row = [
        plan.provider,
        plan.region or "-",
        plan.instance_type or "-",
        plan.gpus or "-",
        plan.nodes,
        money(plan.price_per_node),
        money(plan.per_hour),
    ]
    if plan.max_hours is not None:
        columns.append(f"total for {plan.max_hours:g} h")
        row.append(money(plan.for_max_hours))
    output.table(columns, [row], title="plan" + (" (spot)" if plan.spot else ""))
    if plan.data_region is not None:
        if plan.egress_usd_per_gb:
            print(
                f"data in {plan.data_region}: no offer there meets the ask; reading it from "
                f"{plan.region} costs about ${plan.egress_usd_per_gb:.2f}/GB in egress"
            )
        else:
            print(f"data in {plan.data_region}: compute goes there (no egress)")


def _show_nodes(rec) -> None:
    output.table(
        ["node", "id", "ip", "gpus", "status"],
        [
            [
                f"node{n.idx}",
                n.node_id,
                n.ip,
                f"{n.gpus} x {n.gpu_type}" if n.gpus else "-",
                n.status,
            ]
            for n in rec.nodes
        ],
        title=f"{rec.name} ({rec.provider}, {rec.status})",
    )


def down(
    names: list[str] | None = typer.Argument(None, help="Clusters to tear down."),
    all_: bool = typer.Option(False, "--all", help="Tear down every cluster in state."),
    purge: bool = typer.Option(
        False, "--purge", help="Forget the cluster even if teardown cannot be confirmed."
    ),
    yes: bool = options.YES,
) -> None:
    """Terminate a cluster's nodes, confirm they are gone, then forget it. Safe to repeat."""
    from mlcloud import cluster, state
    from mlcloud.errors import MlcloudError, UsageError
    from mlcloud.names import check_cluster_name

    if bool(names) == all_:
        raise UsageError("name the clusters to tear down, or pass --all (not both)")
    store = state.open_store()
    targets = [c.name for c in store.list_clusters()] if all_ else names or []
    for n in targets:
        check_cluster_name(n)
    if not targets:
        print("no clusters to tear down")
        return
    output.confirm(f"tear down {', '.join(targets)} and delete everything on their nodes?", yes)
    rep = output.reporter()
    failed: list[MlcloudError] = []
    try:
        for n in targets:  # one cluster failing must not leave the others running
            try:
                if cluster.down(store, n, rep, purge=purge):
                    rep.info(f"cluster {n} is down: no node left")
                else:
                    rep.info(f"no cluster named {n!r} in state; nothing to do")
            except MlcloudError as e:
                if len(targets) == 1:
                    raise
                rep.warn(str(e))
                failed.append(e)
    finally:
        output.close(rep)
    if failed:
        raise MlcloudError(f"{len(failed)} of {len(targets)} cluster(s) not torn down (see above)")


def status(
    name: str | None = typer.Argument(None, help="Show one cluster in detail."),
    json: bool = options.JSON,
) -> None:
    """List clusters with their nodes and jobs, from local state (no cloud calls); a job that
    no mlcloud process follows any more is read from its nodes."""
    from mlcloud import state, views
    from mlcloud.errors import NotFoundError
    from mlcloud.names import check_cluster_name

    store = state.open_store()
    if name:
        check_cluster_name(name)
        rec = store.get_cluster(name)
        if rec is None:
            raise NotFoundError(f"no cluster named {name!r}; `mlcloud status` lists them all")
        clusters, jobs = [rec], store.jobs(name, rec.uid)
    else:
        clusters = store.list_clusters()
        current = {c.uid for c in clusters}  # an old incarnation's jobs are not this cluster's
        jobs = [j for j in store.jobs() if j.uid in current]
    if any(j.status not in state.JOB_DONE for j in jobs):  # unfollowed ones: ask their nodes
        from mlcloud import reconcile

        jobs = [reconcile.reconcile(store, j) for j in jobs]
    now = time.time()
    billing = store.billing(name)
    if json:
        output.print_json(views.status_json(clusters, jobs, billing, now))
        return
    if not clusters:
        print("no clusters; create one with `mlcloud up NAME`")
        return
    last = {j.cluster: j for j in jobs}
    money = views.money_by_cluster(clusters, billing, now)
    if not name:
        output.table(
            ["name", "provider", "status", "nodes", "gpus", "$/h", "cost", "last job", "age"],
            [
                [
                    c.name,
                    c.provider,
                    c.status,
                    len(c.nodes),
                    sum(n.gpus for n in c.nodes) or "-",
                    f"{money[c.name][0]:.2f}",
                    f"{money[c.name][1]:.2f}",
                    f"{last[c.name].job_id} {last[c.name].status}" if c.name in last else "-",
                    output.age(now - c.created),
                ]
                for c in clusters
            ],
        )
        return
    rec = clusters[0]
    _show_nodes(rec)
    rate, spent = money[rec.name]
    print(f"cost: ${rate:.2f}/h now, ${spent:.2f} so far")
    events = [e for e in store.events(rec.name) if e[0] >= rec.created][-10:]
    if events:
        print()
        output.table(
            ["when", "event", "detail"],
            [[output.age(now - t) + " ago", kind, message] for t, kind, message in events],
            title="events",
        )
    if jobs:
        print()
        output.table(
            ["job", "status", "exit", "command", "started", "duration"],
            [
                [
                    j.job_id,
                    j.status,
                    "" if j.exit_code is None else j.exit_code,
                    j.command,
                    output.age(now - j.submitted) + " ago",
                    output.age((j.ended or now) - j.submitted),
                ]
                for j in jobs
            ],
            title="jobs",
        )


def ssh(
    name: str = typer.Argument(..., help="Cluster."),
    node: int = typer.Option(0, "--node", min=0, help="Node index (0 is the head)."),
) -> None:
    """Open an interactive shell on a node, in the job's working directory."""
    import os

    from mlcloud import cluster, state
    from mlcloud.errors import UsageError

    h = cluster.open_cluster(state.open_store(), name)
    if node >= len(h.nodes):
        raise UsageError(f"--node {node}: cluster {name} has nodes 0 to {len(h.nodes) - 1}")
    argv = h.transports[node].interactive(f"{h.nodes[node].root}/workdir")
    h.close()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise UsageError(f"{argv[0]} not found on PATH; install the OpenSSH client") from None


def gc(
    provider: str | None = typer.Option(None, "--provider", "-p", help="Only this cloud."),
    region: list[str] | None = typer.Option(
        None, "--region", help="Regions to search (repeatable; default: the configured one)."
    ),
    all_owners: bool = typer.Option(
        False, "--all-owners", help="Also clusters launched by other users (default: yours)."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete what was found."),
    json: bool = options.JSON,
) -> None:
    """Find cloud resources tagged by mlcloud whose cluster is not in local state; delete them
    only with --yes. Resources without mlcloud's tags are never touched."""
    from dataclasses import asdict

    from mlcloud import gc as collector
    from mlcloud import state

    store = state.open_store()
    from mlcloud.cluster import owner

    found = collector.orphans(store, provider, region or [], None if all_owners else owner())
    if found and yes:
        collector.delete(found)  # before anything says they are gone
    if json:
        output.print_json({"orphans": [asdict(r) for r in found], "deleted": yes and bool(found)})
        return
    if not found:
        print("no orphaned resources")
        return
    output.table(
        ["provider", "region", "kind", "id", "cluster"],
        [
            [r.provider, r.region, r.kind, r.id, f"{r.cluster_name} ({r.cluster_uid})"]
            for r in found
        ],
    )
    print(f"deleted {len(found)} resource(s)" if yes else "rerun with --yes to delete them")
