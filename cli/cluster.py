"""`up`, `down`, `status`: the cluster's lifecycle."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import typer
from mlcloud.cli import options, output


def load(file: Path | None, ssh: dict | None = None, **overrides):
    """The spec from -f (if any) with command-line flags laid over it."""
    from mlcloud.errors import UsageError
    from mlcloud.spec.task import TaskSpec, load_spec

    spec = load_spec(file) if file else TaskSpec()
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "nodes" in changes:
        from mlcloud.spec.task import parse_nodes

        if changes["nodes"].lstrip("-").isdigit() and int(changes["nodes"]) < 1:
            raise UsageError(f"--nodes: must be 1 or more, got {changes['nodes']}")
        changes["min_nodes"], changes["nodes"] = parse_nodes(changes["nodes"])
    ssh_changes = {k: v for k, v in (ssh or {}).items() if v is not None}
    if ssh_changes:
        changes["ssh"] = replace(spec.ssh, **ssh_changes)
    return replace(spec, **changes)


def _nodes_option(value: str | None) -> str | None:
    """Something neither a number nor MIN:MAX is a usage error, like any mistyped option."""
    import re

    if value is not None and not re.fullmatch(r"\s*-?\d+\s*(:\s*\d+\s*)?", value):
        raise typer.BadParameter(f"{value!r} is not a valid number of nodes or MIN:MAX (e.g. 1:4)")
    return value


def cluster_name(name: str | None, spec_name: str | None) -> str:
    from mlcloud.errors import UsageError
    from mlcloud.spec.task import check_cluster_name

    chosen = name or spec_name
    if not chosen:
        raise UsageError("name the cluster: `mlcloud up NAME` or `name:` in the spec file")
    return check_cluster_name(chosen)


def up(
    name: str | None = typer.Argument(None, help="Cluster name (default: the spec's name)."),
    file: Path | None = options.SPEC_FILE,
    provider: str | None = typer.Option(
        None,
        "--provider",
        "-p",
        callback=options.given,
        help="Where the nodes run (default: local).",
    ),
    nodes: str | None = typer.Option(
        None,
        "--nodes",
        "-n",
        callback=lambda v: _nodes_option(v),
        help="Number of nodes, or MIN:MAX for an elastic job (e.g. 1:4).",
    ),
    hosts: str | None = typer.Option(
        None,
        "--hosts",
        callback=options.given,
        help="ssh provider: user@h1[:port],user@h2 (one node per host; hosts beyond --nodes "
        "are spares that replace lost nodes).",
    ),
    identity: Path | None = options.IDENTITY,
    ssh_user: str | None = options.SSH_USER,
    ssh_port: int | None = options.SSH_PORT,
    proxy_command: str | None = options.PROXY_COMMAND,
    allow_proxy_command: bool = typer.Option(
        False,
        "--allow-proxy-command",
        help="Run the spec file's ssh.proxy_command without asking (for runs with no terminal).",
    ),
    allow_ssh_from: list[str] | None = typer.Option(
        None,
        "--allow-ssh-from",
        callback=options.given,
        help="Clouds: CIDR allowed to reach SSH (repeatable; default: this machine's address).",
    ),
    instance_type: str | None = typer.Option(
        None, "--instance-type", callback=options.given, help="e.g. g5.xlarge"
    ),
    region: str | None = typer.Option(
        None, "--region", callback=options.given, help="Cloud region."
    ),
    zone: str | None = typer.Option(
        None, "--zone", callback=options.given, help="Zone (default: any with capacity)."
    ),
    project: str | None = typer.Option(
        None,
        "--project",
        callback=options.given,
        help="GCE: the Google Cloud project (default: GOOGLE_CLOUD_PROJECT).",
    ),
    spot: bool | None = typer.Option(None, "--spot/--on-demand", help="Spot instances."),
    image: str | None = typer.Option(
        None, "--image", callback=options.given, help="Machine image (default: DLAMI)."
    ),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        callback=options.given,
        help="GPUs per node, e.g. A100:8: the cheapest matching offer is picked.",
    ),
    max_hours: float | None = options.number(
        None,
        "--max-hours",
        min=0,
        max=87600,
        above=True,
        help="Show the plan's cost for this many hours.",
    ),
    near: str | None = typer.Option(
        None,
        "--near",
        callback=options.given,
        help="Where the data is (REGION, s3://bucket, gs://bucket): compute goes there when "
        "it can, else the egress estimate is shown.",
    ),
    yes: bool = options.YES,
    json: bool = options.JSON,
) -> None:
    """Create a cluster, or finish creating one that an earlier `up` left half made."""
    from mlcloud.cli import views

    from mlcloud import state
    from mlcloud.provision import lifecycle
    from mlcloud.spec import plan as planner
    from mlcloud.spec.locality import locate, locate_data

    spec = flagged_spec(
        file,
        provider=provider,
        nodes=nodes,
        hosts=hosts,
        identity=identity,
        ssh_user=ssh_user,
        ssh_port=ssh_port,
        proxy_command=proxy_command,
        allow_proxy_command=allow_proxy_command,
        allow_ssh_from=allow_ssh_from,
        instance_type=instance_type,
        region=region,
        zone=zone,
        project=project,
        spot=spot,
        image=image,
        gpus=gpus,
    )
    name = cluster_name(name, spec.name)
    store = state.open_store()
    existing = store.get_cluster(name)
    if existing is not None:  # its nodes stopped: "up" would be a word, not a cluster
        from mlcloud.control import nodeevents

        nodeevents.refuse_stopped(store, existing)
    # compute goes to the data: --near, else the spec's storage.data
    data = locate(near) if near else locate_data(spec.storage.data, output.reporter(json).warn)
    spec, plan = planner.make(spec, _default_region, max_hours, data)
    if existing is None and planner.priced(plan.provider):
        # a cloud refuses what it cannot serve (credentials, instance type, region) before
        # the plan is shown and confirmed
        from mlcloud import providers

        providers.get(plan.provider).check(
            replace(
                lifecycle.request_for(spec, spec.node_count), fallback_regions=plan.fallback_regions
            )
        )
    if not json and existing is None and planner.priced(plan.provider):
        _show_plan(plan)
    if existing is None and plan.per_hour != 0:
        what = "an unpriced" if plan.per_hour is None else f"${plan.per_hour:.2f}/h"
        output.confirm(f"launch {plan.nodes} x {plan.instance_type} ({what})?", yes)
    rep = output.reporter(quiet=json)
    if existing is None and spec.autoscale.max_cost is not None and not plan.per_hour:
        print(
            f"warning: autoscale.max_cost is set but {plan.provider} nodes have no price here: "
            "no budget stop will happen (idle and heartbeat rules still apply)",
            file=sys.stderr,
        )
    try:
        rec = lifecycle.up(
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


def flagged_spec(
    file: Path | None,
    *,
    provider: str | None,
    nodes: str | None,
    hosts: str | None,
    identity: Path | None,
    ssh_user: str | None,
    ssh_port: int | None,
    proxy_command: str | None,
    allow_proxy_command: bool,
    allow_ssh_from: list[str] | None,
    instance_type: str | None,
    region: str | None,
    zone: str | None,
    project: str | None,
    spot: bool | None,
    image: str | None,
    gpus: str | None,
    workdir: str | None = None,
):
    """The spec from -f with `up`'s flags laid over it (`up` and `launch`)."""
    from mlcloud.spec.task import check_cidr, split_list

    host_list = split_list(hosts, "--hosts", "alice@10.0.0.5,alice@10.0.0.6")
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
        workdir=workdir,
    )
    if file and spec.ssh.proxy_command and not proxy_command:
        _trust_proxy_command(file, spec.ssh.proxy_command, allow_proxy_command)
    if project:
        spec = replace(spec, gce=replace(spec.gce, project=project))
    if instance_type:
        spec = replace(spec, resources=replace(spec.resources, instance_type=instance_type))
    if gpus:
        from mlcloud.spec.task import parse_gpus

        spec = replace(spec, resources=replace(spec.resources, gpus=parse_gpus(gpus)))
    return spec


def _trust_proxy_command(file: Path, command: str, allowed: bool) -> None:
    """A spec file's proxy command runs on this machine: a person confirms it once."""
    import sys

    from mlcloud.provision import trust

    trust.check_proxy_command(file, command, allowed, output.ask if sys.stdin.isatty() else None)


def _default_region(provider: str) -> str | None:
    from mlcloud import providers

    return providers.get(provider).default_region()


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


def _node_name(node: int | None) -> str:
    return "-" if node is None else f"node{node}"


def _health(store, rec) -> tuple[str, str | None]:
    """The cluster's status as `status` shows it (STOPPED, DEGRADED beyond the row's); the
    event log is read only when a node is down."""
    from mlcloud.providers.base import GONE

    from mlcloud.control import nodeevents

    stopped = any(n.status in GONE for n in rec.nodes)
    reasons = nodeevents.stop_reasons(nodeevents.log(store, rec)) if stopped else {}
    return nodeevents.health(rec, reasons)


def _show_nodes(
    rec, stopped: dict[int, str] | None = None, health: tuple[str, str | None] | None = None
) -> None:
    """The node table; stopped: node -> why its agent shut it down; health: what `status`
    reads of the cluster (default: the row's status)."""
    stopped = stopped or {}
    status, reason = health or (rec.status, None)
    output.table(
        ["node", "id", "ip", "gpus", "python", "status"],
        [
            [
                f"node{n.idx}",
                n.node_id,
                n.ip,
                f"{n.gpus} x {n.gpu_type}" if n.gpus else "-",
                n.python or "-",
                f"{n.status} ({stopped[n.idx]})"
                if n.idx in stopped and n.status == "terminated"
                else n.status,
            ]
            for n in rec.nodes
        ],
        title=f"{rec.name} ({rec.provider}, {status}" + (f": {reason})" if reason else ")"),
    )


def down(
    names: list[str] | None = typer.Argument(None, help="Clusters to tear down."),
    all_: bool = typer.Option(False, "--all", help="Tear down every cluster in state."),
    purge: bool = typer.Option(
        False, "--purge", help="Forget the cluster even if teardown cannot be confirmed."
    ),
    yes: bool = options.YES,
    json: bool = options.JSON,
) -> None:
    """Terminate a cluster's nodes, confirm they are gone, then forget it. Safe to repeat; a
    name state does not know exits 1 (not_found), after the known ones are down."""
    from mlcloud import state
    from mlcloud.errors import MlcloudError, NotFoundError, UsageError
    from mlcloud.provision import lifecycle
    from mlcloud.spec.task import check_cluster_name

    if bool(names) == all_:
        raise UsageError("name the clusters to tear down, or pass --all (not both)")
    store = state.open_store()
    asked = [c.name for c in store.list_clusters()] if all_ else names or []
    for n in asked:
        check_cluster_name(n)
    missing = [] if all_ else [n for n in asked if store.get_cluster(n) is None]
    unknown = (
        NotFoundError(
            f"no cluster named {', '.join(map(repr, missing))}; `mlcloud status` lists them all"
        )
        if missing
        else None
    )
    targets = [n for n in asked if n not in missing]
    if not targets:
        if unknown:
            raise unknown
        if json:
            output.print_json({"clusters": []})
        else:
            print("no clusters to tear down")
        return
    from mlcloud.jobs.pull import unpulled

    unseen = {n: unpulled(store, n) for n in targets}
    never = [f"job {j} of {n}" for n, j in unseen.items() if j is not None]
    question = f"tear down {', '.join(targets)} and delete everything on their nodes?"
    if never and not json:  # --json says it in a field instead
        question = (
            f"the outputs of {', '.join(never)} were never pulled (`mlcloud pull`); {question}"
        )
    output.confirm(question, yes)
    rep = output.reporter(quiet=json)
    if never and yes:
        rep.warn(f"the outputs of {', '.join(never)} were never pulled; they go with the nodes")
    failed: list[MlcloudError] = []
    done: list[dict] = []
    try:
        for n in targets:  # one cluster failing must not leave the others running
            try:
                gone = lifecycle.down(store, n, rep, purge=purge)
            except MlcloudError as e:
                done.append(
                    {"name": n, "status": "failed", "error": str(e), "unpulled_job": unseen[n]}
                )
                if len(asked) == 1 and not json:
                    raise
                rep.warn(str(e))
                failed.append(e)
                continue
            if gone is None:
                rep.info(f"no cluster named {n!r} in state; nothing to do")
                done.append({"name": n, "status": "unknown", "unpulled_job": None})
                continue
            rep.info(
                f"cluster {n} is forgotten; its nodes were not all confirmed gone (see above)"
                if gone.unconfirmed
                else f"cluster {n} is down: no node left"
            )
            done.append(
                {
                    "name": n,
                    "status": "purged" if gone.unconfirmed else "down",
                    "uid": gone.uid,
                    "provider": gone.provider,
                    "nodes": list(gone.nodes),
                    "error": gone.unconfirmed,
                    "unpulled_job": unseen[n],
                }
            )
    finally:
        output.close(rep)
    done += [{"name": n, "status": "not_found", "unpulled_job": None} for n in missing]
    first = failed[0] if len(asked) == 1 and failed else None
    if failed and not first:
        first = MlcloudError(
            f"{len(failed)} of {len(targets)} cluster(s) not torn down (see above)"
            + (f"; {unknown}" if unknown else "")
        )
    first = first or unknown
    if json:
        output.print_json({"clusters": done})
        if first:  # said in the document above: stdout holds one JSON document
            print(f"error: {first}", file=sys.stderr)
            raise typer.Exit(first.exit_code)
    if first:
        raise first


def status(
    name: str | None = typer.Argument(None, help="Show one cluster in detail."),
    mine: bool = typer.Option(
        False, "--mine", help="Only the clusters made from this user@host (a shared store)."
    ),
    json: bool = options.JSON,
) -> None:
    """List clusters with their nodes and jobs and who made each, from state (no cloud
    calls); a job that no mlcloud process follows any more is read from its nodes. With NAME,
    the nodes' agents are asked too: a node that shut itself down shows as terminated, with
    the reason."""
    from mlcloud.cli import views

    from mlcloud import state
    from mlcloud.control import nodeevents
    from mlcloud.errors import NotFoundError
    from mlcloud.spec.task import check_cluster_name

    store = state.open_store()
    if name:
        from mlcloud.cli import managed

        check_cluster_name(name)
        mj = managed.managed_job(store, name)
        if mj is not None and (json or store.get_cluster(managed.resolve(store, name)) is None):
            managed.show_jobs(store, [mj], json)  # ended: its story; --json: the job's shape
            return
        if mj is not None:
            print(f"managed job {name}: {mj.status}, {len(mj.clusters)} cluster(s); now:")
            name = managed.resolve(store, name)
        rec = store.get_cluster(name)
        if rec is None:
            raise NotFoundError(f"no cluster named {name!r}; `mlcloud status` lists them all")
        if nodeevents.refresh(store, rec):
            rec = store.get_cluster(name) or rec
        clusters, jobs = [rec], store.jobs(name, rec.uid)
    else:
        clusters = store.list_clusters()
        if mine:
            me = state.whoami()
            clusters = [c for c in clusters if c.made_by == me]
        current = {c.uid for c in clusters}  # an old incarnation's jobs are not this cluster's
        jobs = [j for j in store.jobs() if j.uid in current]
    if any(j.status not in state.JOB_DONE for j in jobs):  # unfollowed ones: ask their nodes
        from mlcloud.jobs import reconcile

        jobs = [reconcile.reconcile(store, j) for j in jobs]
    now = time.time()
    billing = store.billing(name)
    health = {c.name: _health(store, c) for c in clusters}
    if json:
        out = views.status_json(clusters, jobs, billing, now, health)
        if name:  # as the text shows: why a node stopped, and the newest events
            events = nodeevents.log(store, clusters[0])
            reasons = nodeevents.stop_reasons(events)
            for n in out["clusters"][0]["nodes"]:
                if n["status"] == "terminated" and n["index"] in reasons:
                    n["reason"] = reasons[n["index"]]
            out["clusters"][0]["events"] = [
                {"time": views.iso(e.time), "kind": e.kind, "node": e.node, "message": e.message}
                for e in events[-10:]
            ]
        output.print_json(out)
        return
    if not clusters:
        print("no clusters; create one with `mlcloud up NAME`")
        return
    last = {j.cluster: j for j in jobs}
    money = views.money_by_cluster(clusters, billing, now)
    if not name:
        output.table(
            ["name", "provider", "status", "nodes", "gpus", "$/h", "cost", "last job", "age", "by"],
            [
                [
                    c.name,
                    c.provider,
                    health[c.name][0],
                    len(c.nodes),
                    sum(n.gpus for n in c.nodes) or "-",
                    f"{money[c.name][0]:.2f}",
                    f"{money[c.name][1]:.2f}",
                    f"{last[c.name].job_id} {last[c.name].status}" if c.name in last else "-",
                    output.age(now - c.created),
                    c.made_by or "-",
                ]
                for c in clusters
            ],
        )
        return
    rec = clusters[0]
    events = nodeevents.log(store, rec)
    _show_nodes(rec, nodeevents.stop_reasons(events), health[rec.name])
    rate, spent = money[rec.name]
    print(f"cost: ${rate:.2f}/h now, ${spent:.2f} so far")
    if events:
        print()
        output.table(
            ["when", "event", "node", "detail"],
            [
                [output.age(now - e.time) + " ago", e.kind, _node_name(e.node), e.message]
                for e in events[-10:]
            ],
            title=f"events (newest; all: `mlcloud events {rec.name}`)",
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
    node: int = options.whole(0, "--node", min=0, help="Node index (0 is the head)."),
) -> None:
    """Open an interactive shell on a node, in the job's working directory."""
    import os

    from mlcloud import state
    from mlcloud.errors import UsageError
    from mlcloud.provision import handle

    h = handle.open_cluster(state.open_store(), name)
    if node >= len(h.nodes):
        raise UsageError(f"--node {node}: cluster {name} has nodes 0 to {len(h.nodes) - 1}")
    argv = h.transports[node].interactive(f"{h.nodes[node].root}/workdir")
    h.close()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise UsageError(f"{argv[0]} not found on PATH; install the OpenSSH client") from None


def gc(
    provider: str | None = typer.Option(
        None,
        "--provider",
        "-p",
        callback=options.given,
        help="Only this provider (local, ssh, aws or gce).",
    ),
    region: list[str] | None = typer.Option(
        None,
        "--region",
        callback=options.given,
        help="Regions to search (repeatable; default: the configured one).",
    ),
    all_owners: bool = typer.Option(
        False, "--all-owners", help="Also delete clusters made by other homes (other owners)."
    ),
    owner: list[str] | None = typer.Option(
        None,
        "--owner",
        callback=options.given,
        help="Also delete the clusters of this owner id (repeatable).",
    ),
    min_age: float = options.number(
        10.0,
        "--min-age",
        min=0,
        max=525600,
        help="Keep clusters younger than this many minutes.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list; delete nothing."),
    yes: bool = options.YES,
    json: bool = options.JSON,
) -> None:
    """Find resources tagged by mlcloud whose cluster is not in local state, list them, and
    delete those marked delete once confirmed: only this home's (other owners' need
    --all-owners or --owner) and none younger than --min-age. Resources without mlcloud's
    tags are never touched."""
    from dataclasses import asdict

    from mlcloud import state
    from mlcloud.provision import gc as collector
    from mlcloud.provision.handle import owner as this_home

    store = state.open_store()
    me = this_home(store)
    search = collector.find(store, provider, region or [])
    owners = None if all_owners else set(owner or ())
    orphans = collector.decide(search.found, me, owners, min_age * 60, time.time())
    ready = sum(o.action == collector.DELETE for o in orphans)
    if not json:
        _show_orphans(search.skipped, orphans)
    if ready and not dry_run:
        output.confirm(f"delete the {ready} resource(s) marked delete?", yes)
    deleted = [] if dry_run else collector.delete(orphans)  # before anything says they are gone
    if json:
        output.print_json(
            {
                "owner": me,
                "orphans": [
                    {**asdict(o.resource), "this_home": o.mine, "action": o.action} for o in orphans
                ],
                "deleted": len(deleted),
                "skipped": search.skipped,
            }
        )
    elif orphans and dry_run:
        print(
            f"rerun without --dry-run to delete the {ready} marked delete"
            if ready
            else "nothing to delete (see action)"
        )
    elif orphans:
        print(f"deleted {len(deleted)} resource(s), kept {len(orphans) - len(deleted)}")


def _show_orphans(skipped: list[str], orphans) -> None:
    for line in skipped:
        typer.echo(f"warning: {line}", err=True)
    if not orphans:
        print("no orphaned resources")
        return
    now = time.time()
    output.table(
        ["provider", "region", "kind", "id", "cluster", "owner", "age", "action"],
        [
            [
                r.provider,
                r.region or "-",
                r.kind,
                r.id,
                f"{r.cluster_name} ({r.cluster_uid})",
                "this home" if o.mine else f"other owner {r.owner or '?'}",
                output.age(now - r.created) if r.created is not None else "-",
                o.action,
            ]
            for o in orphans
            for r in [o.resource]
        ],
    )
