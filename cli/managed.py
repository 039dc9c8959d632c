"""`launch` and `jobs`: managed jobs, kept alive across clusters (mlcloud/control/managed.py).

`launch` takes every option of `up` and `train`: their very definitions, read from those
commands' signatures, so a flag means the same thing in all three."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer
from mlcloud.cli import cluster, jobs, options, output

_UP = {k: p.default for k, p in inspect.signature(cluster.up).parameters.items()}
_TRAIN = {k: p.default for k, p in inspect.signature(jobs.train).parameters.items()}


class LaunchCommand(jobs.TrainCommand):
    """`launch`, whose --pull may be given without its DEST, as train's."""


def launch(
    name: str = typer.Argument(
        ..., help="The managed job's name; its clusters are NAME-1, NAME-2, ..."
    ),
    script: str | None = _TRAIN["script"],
    script_args: list[str] | None = _TRAIN["script_args"],
    file: Path | None = options.SPEC_FILE,
    provider: str | None = _UP["provider"],
    nodes: str | None = _UP["nodes"],
    hosts: str | None = _UP["hosts"],
    identity: Path | None = options.IDENTITY,
    ssh_user: str | None = options.SSH_USER,
    ssh_port: int | None = options.SSH_PORT,
    proxy_command: str | None = options.PROXY_COMMAND,
    allow_proxy_command: bool = _UP["allow_proxy_command"],
    allow_ssh_from: list[str] | None = _UP["allow_ssh_from"],
    instance_type: str | None = _UP["instance_type"],
    region: str | None = _UP["region"],
    zone: str | None = _UP["zone"],
    project: str | None = _UP["project"],
    spot: bool | None = _UP["spot"],
    image: str | None = _UP["image"],
    gpus: str | None = _UP["gpus"],
    max_hours: float | None = _UP["max_hours"],
    near: str | None = _UP["near"],
    workdir: Path | None = _TRAIN["workdir"],
    nproc_per_node: int | None = _TRAIN["nproc_per_node"],
    env: list[str] | None = _TRAIN["env"],
    detach: bool = typer.Option(
        False,
        "--detach",
        "-d",
        help="Return once the job runs: `mlcloud autoscale --all` watches it (a shared store).",
    ),
    pull_to: str | None = typer.Option(
        None,
        "--pull",
        metavar="[DEST]",
        help="Where the job's outputs go when it ends (default: ./mlcloud-results/NAME/CLUSTER);"
        " write --pull=DEST before the script.",
    ),
    yes: bool = options.YES,
    json_out: bool = _TRAIN["json_out"],
) -> None:
    """Run SCRIPT as a managed job: make cluster NAME-1, keep the job alive across lost
    nodes and clusters (README, "Managed jobs"), pull its outputs, down every cluster it made,
    and exit with the job's own code. Run it again after it was killed to resume watching.

    Ctrl-C or SIGTERM stops the job and downs its clusters; --detach leaves it running."""
    from mlcloud import state
    from mlcloud.control import managed
    from mlcloud.errors import BusyError, UsageError
    from mlcloud.jobs import launch as job_launch
    from mlcloud.spec.task import check_cluster_name, parse_env

    check_cluster_name(name)
    store = state.open_store()
    if detach and store.path is not None:
        raise UsageError(
            "--detach hands the job to `mlcloud autoscale --all`, which needs a shared store: "
            "set MLCLOUD_STATE_URL (or state_url: in config.yaml)"
        )
    # one watcher a job: held while this launch watches, freed with it (a kill -9 included)
    release = state.lead(managed.lead_key(name))
    if release is None:
        job = store.get_managed(name)
        raise BusyError(
            f"managed job {name} is watched by {job.watcher if job else 'another launch'}; "
            f"`mlcloud logs {name} --follow` to watch it, `mlcloud cancel {name}` to stop it"
        )
    try:
        dest = jobs._pull_dest(pull_to)
        job = store.get_managed(name)
        if job is not None and job.status not in state.JOB_DONE:
            if not store.claim_managed(name, job.watcher, managed.me()):
                raise BusyError(f"managed job {name} was just taken by another launch")
            from mlcloud.spec.task import TaskSpec

            spec = TaskSpec.from_dict({**job.spec, "envs": {}})  # the request has them
            req = managed.request_of(job, parse_env(env or []))
            dest = dest or (Path(job.request["pull"]) if job.request.get("pull") else None)
            print(f"resuming managed job {name} ({len(job.clusters)} cluster(s) so far)")
        else:
            if store.get_cluster(name) is not None:
                raise UsageError(f"{name!r} is a cluster's name; name the managed job otherwise")
            spec = cluster.flagged_spec(
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
                workdir=str(workdir.resolve()) if workdir else None,
            )
            from dataclasses import replace

            req = replace(
                jobs.job_request(spec, script, script_args, nproc_per_node, env),
                checkpoint_name=name,
            )
            job_launch.validate(req)
            data = None
            if near:
                from mlcloud.spec.locality import locate

                data = locate(near).region
            places = managed.places(spec, near=data)
            _show_places(name, spec.node_count, places, max_hours, json_out)
            first = places[0]
            if first.price:
                output.confirm(
                    f"launch managed job {name} on {first} at "
                    f"${first.price * spec.node_count:.2f}/h?",
                    yes,
                )
            on_demand = None if first.on_demand is None else first.on_demand * spec.node_count
            job = store.create_managed(
                name,
                managed.stored_spec(spec),
                managed.request_dict(req, str(dest) if dest else None, data),
                on_demand,
                managed.me(),
            )
        rep = output.reporter(quiet=json_out)
        sink = jobs._printer(sys.stderr if json_out else sys.stdout)
        watcher = managed.Watcher(store, name, spec, req, rep, sink)
        if detach:
            try:
                if job.clusters:  # a resumed job runs: only the watch is handed over
                    store.update_managed(name, watcher=managed.DETACHED)
                else:
                    watcher.start()
            except BaseException:
                managed.cancel(store, name, rep)  # nothing half-started is left billing
                raise
            finally:
                output.close(rep)
            if json_out:
                from mlcloud.cli import views

                output.print_json({"managed": views.managed_json(store, store.get_managed(name))})
            else:
                print(
                    f"managed job {name} runs on {name}-1, watched by `mlcloud autoscale "
                    f"--all`: `mlcloud jobs` to see it, `mlcloud cancel {name}` to stop it"
                )
            return
        code = 1
        keep = None
        try:
            code = watcher.run()
        finally:
            output.close(rep)
            last = managed.last_job(store, name)
            if last is not None and not watcher.interrupted:
                where = dest or Path("mlcloud-results") / name / last[0]
                pulled = jobs._pull_after(store, last[0], last[1], where, True)
                keep = last[0] if pulled else None
                code = code or pulled
            rep = output.reporter(quiet=json_out)
            try:
                managed.down_all(store, name, rep, keep=keep)
            finally:
                output.close(rep)
        if json_out:  # train's shape for the job's last run, and the managed job's own
            from mlcloud.cli import views

            ran = store.get_job(last[0], last[1]) if last else None
            output.print_json(
                {
                    **(views.job_result_json(ran) if ran else {}),
                    "managed": views.managed_json(store, store.get_managed(name)),
                }
            )
        raise typer.Exit(code)
    finally:
        release()


def _show_places(name, nodes, places, max_hours, json_out) -> None:
    if json_out or not places[0].price:
        return

    def money(v):
        return "-" if v is None else f"${v * nodes:,.2f}"

    columns = ["placement", "type", "$/h", "on demand $/h"]
    if max_hours is not None:
        columns.append(f"total for {max_hours:g} h")
    rows = []
    for p in places[:5]:
        row = [str(p), p.instance_type or "-", money(p.price), money(p.on_demand)]
        if max_hours is not None:
            row.append(money(None if p.price is None else p.price * max_hours))
        rows.append(row)
    output.table(columns, rows, title=f"{name}: placements, cheapest first ({nodes} node(s))")


def jobs_(json_out: bool = options.JSON) -> None:
    """Every managed job: its clusters in order (where, $/h, from, to, why it ended),
    restarts, steps lost, cost so far, and the same run's cost on demand in its first
    placement."""

    from mlcloud import state

    store = state.open_store()
    show_jobs(store, store.list_managed(), json_out)


def show_jobs(store, found: list, json_out: bool) -> None:
    from mlcloud.cli import views

    if json_out:
        output.print_json({"jobs": [views.managed_json(store, j) for j in found]})
        return
    if not found:
        print("no managed jobs: `mlcloud launch NAME -f SPEC SCRIPT` starts one")
        return
    for j in found:
        d = views.managed_json(store, j)
        on_demand = d["on_demand_usd"]
        print(
            f"{j.name}: {j.status}"
            + (f" (exit {j.exit_code})" if j.exit_code is not None else "")
            + f", {j.restarts} restart(s), {j.steps_lost} step(s) lost, "
            f"${d['cost_usd']:.2f} so far"
            + (f" (on demand: ${on_demand:.2f})" if on_demand is not None else "")
        )
        output.table(
            ["cluster", "where", "$/h", "from", "to", "why it ended"],
            [
                [
                    c["cluster"],
                    c["where"],
                    "-" if c["usd_per_hour"] is None else f"${c['usd_per_hour']:.2f}",
                    views.when(c["from"]),
                    views.when(c["to"]) if c["to"] else "-",
                    c["why"] or "-",
                ]
                for c in d["clusters"]
            ],
        )


def resolve(store, name: str) -> str:
    """NAME as a cluster: itself, or, when no cluster is called NAME and a managed job is, the
    job's newest cluster (`status`, `logs`, `pull` act on it)."""
    if store.get_cluster(name) is not None:
        return name
    job = store.get_managed(name)
    return job.clusters[-1].cluster if job is not None and job.clusters else name


def managed_job(store, name: str):
    """The managed job NAME names, when no cluster is called NAME."""
    return None if store.get_cluster(name) is not None else store.get_managed(name)
