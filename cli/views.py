"""The stable JSON shapes of `status --json`, `up --json` and the job commands' --json
(schema 1, documented in README)."""

from __future__ import annotations

from datetime import datetime, timezone

from mlcloud import state

SCHEMA = 1


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def job_json(j: state.JobRecord) -> dict:
    return {
        "id": j.job_id,
        "status": j.status,
        "command": j.command,
        "num_nodes": j.num_nodes,
        "nproc_per_node": j.nproc_per_node,
        "submitted": iso(j.submitted),
        "ended": iso(j.ended),
        "exit_code": j.exit_code,
        "log": j.log_path,
        # a running job nobody follows any more (its mlcloud process died): say so
        "followed": j.status in state.JOB_DONE
        or (j.driver_pid is not None and state.pid_alive(j.driver_pid)),
    }


def job_result_json(j: state.JobRecord, stopped_by: str | None = None) -> dict:
    """What `train --json`, `train --detach --json` and `cancel --json` print. stopped_by: the
    rule that stopped the job (stall, budget, idle, heartbeat, cancel, down, interrupt)."""
    return {
        "cluster": j.cluster,
        "job_id": j.job_id,
        "status": j.status,
        "exit_code": j.exit_code,
        "log": j.log_path,
        "stopped_by": stopped_by,
    }


def cluster_json(
    c: state.ClusterRecord,
    jobs: list[state.JobRecord],
    health: tuple[str, str | None] | None = None,
) -> dict:
    """health: (status, reason) as `nodeevents.health` reads the cluster (default: the row's)."""
    status, reason = health or (c.status, None)
    return {
        "name": c.name,
        "uid": c.uid,
        "provider": c.provider,
        "status": status,
        "reason": reason,
        "owner": c.owner,
        "made_by": c.made_by,  # user@host of the home that made it ('' before schema 8)
        "created": iso(c.created),
        "num_nodes": len(c.nodes),
        "nodes": [
            {
                "index": n.idx,
                "id": n.node_id,
                "ip": n.ip,
                "private_ip": n.private_ip,
                "status": n.status,
                "gpus": n.gpus,
                "gpu_type": n.gpu_type,
                "python": n.python,  # the interpreter found at bootstrap ('' if unknown)
            }
            for n in c.nodes
        ],
        "jobs": [job_json(j) for j in jobs],
    }


def money_by_cluster(
    clusters: list[state.ClusterRecord], billing: list, now: float
) -> dict[str, tuple[float, float]]:
    """name -> ($/h now, $ so far) for the clusters' current incarnations."""
    from mlcloud.spec.cost import accrued, hourly

    by_uid: dict[str, list] = {}  # one pass over billing: a store holds thousands of clusters
    for i in billing:
        by_uid.setdefault(i.uid, []).append(i)
    out = {}
    for c in clusters:
        mine = by_uid.get(c.uid, [])
        out[c.name] = (hourly(mine), accrued(mine, now))
    return out


def status_json(
    clusters: list[state.ClusterRecord],
    jobs: list[state.JobRecord],
    billing: list,
    now: float,
    health: dict[str, tuple[str, str | None]],
) -> dict:
    money = money_by_cluster(clusters, billing, now)
    by_cluster: dict[str, list[state.JobRecord]] = {}
    # jobs outlive their cluster (for `logs`); status shows those of clusters that exist
    for j in jobs:
        by_cluster.setdefault(j.cluster, []).append(j)
    return {
        "schema": SCHEMA,
        "clusters": [
            {
                **cluster_json(c, by_cluster.get(c.name, []), health[c.name]),
                "usd_per_hour": round(money[c.name][0], 4),
                "usd_so_far": round(money[c.name][1], 4),
            }
            for c in clusters
        ],
    }


def when(t: float) -> str:
    """A time as `jobs` shows it: local, to the second."""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def managed_json(store: state.Store, j: state.ManagedJob) -> dict:
    """A managed job as `jobs --json` and `launch --json` print it: its clusters in order,
    restarts, steps lost, cost so far, and the same run's cost on demand in its first
    placement (its on-demand $/h over the time it has run)."""
    import time

    from mlcloud.control import managed

    end = j.ended or time.time()
    return {
        "name": j.name,
        "status": j.status,
        "exit_code": j.exit_code,
        "created": iso(j.created),
        "ended": iso(j.ended),
        "restarts": j.restarts,
        "steps_lost": j.steps_lost,
        "cost_usd": round(managed.spent(store, j, end), 4),
        "on_demand_usd": None
        if j.on_demand is None
        else round(j.on_demand * (end - j.created) / 3600, 4),
        "watcher": j.watcher,
        "clusters": [
            {
                "cluster": c.cluster,
                "uid": c.uid,
                "where": ":".join(x for x in (c.provider, c.region, c.zone) if x),
                "usd_per_hour": c.price,
                "from": c.started,
                "to": c.ended,
                "why": c.why,
            }
            for c in j.clusters
        ],
    }
