"""`gpus`, `offers`, `cost`, `catalog`: what GPUs cost before launch, and what clusters cost."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer
from mlcloud.cli import options, output

if TYPE_CHECKING:
    from mlcloud.spec.task import GpuSpec

catalog_app = typer.Typer(help="The GPU price catalog shipped with mlcloud.", no_args_is_help=True)


def gpus(
    model: str | None = typer.Argument(None, help="Only this GPU model, e.g. A100."),
    json: bool = options.JSON,
) -> None:
    """GPU models in the catalog with the counts per machine and price ranges per GPU."""
    from mlcloud.spec import catalog
    from mlcloud.spec.task import GpuSpec

    offers = catalog.load()
    names = catalog.models(offers)
    if model:
        names = [m for m in names if m.lower() == model.lower()]
        if not names:
            catalog.find(offers, GpuSpec(model, 1))  # raises: unknown, with the closest names
    rows = []
    for m in names:
        mine = [o for o in offers if o.gpu_model == m]
        per_gpu = [o.on_demand / o.gpu_count for o in mine]
        spot = [o.spot / o.gpu_count for o in mine if o.spot is not None]
        rows.append(
            {
                "gpu": m,
                "memory_gib": mine[0].gpu_memory_gib,
                "counts": sorted({o.gpu_count for o in mine}),
                "providers": sorted({o.provider for o in mine}),
                "on_demand_usd_per_gpu_hour": [round(min(per_gpu), 4), round(max(per_gpu), 4)],
                "spot_usd_per_gpu_hour": [round(min(spot), 4), round(max(spot), 4)]
                if spot
                else None,
            }
        )
    if json:
        output.print_json({"gpus": rows})
        return
    output.table(
        ["gpu", "memory", "per machine", "providers", "$/GPU-h on-demand", "$/GPU-h spot"],
        [
            [
                r["gpu"],
                f"{r['memory_gib']:g} GiB",
                ",".join(map(str, r["counts"])),
                ",".join(r["providers"]),
                "{:.2f}-{:.2f}".format(*r["on_demand_usd_per_gpu_hour"]),
                "{:.2f}-{:.2f}".format(*r["spot_usd_per_gpu_hour"])
                if r["spot_usd_per_gpu_hour"]
                else "-",
            ]
            for r in rows
        ],
    )


def offers(
    spec: str = typer.Argument(..., help="GPUs per machine: A100:8, H100, L4:1, A100-80GB:8."),
    spot: bool = typer.Option(False, "--spot", help="Spot prices."),
    provider: str | None = typer.Option(None, "--provider", "-p", help="Only this cloud."),
    region: str | None = typer.Option(None, "--region", help="Only this region."),
    max_price: float | None = options.number(
        None, "--max-price", min=0, max=1e6, above=True, help="At most this $/h."
    ),
    live: bool = typer.Option(
        False,
        "--live",
        help="Today's prices per zone or region from the clouds' own APIs (EC2 Spot price "
        "history, the GCE billing catalog), cached with when they were read.",
    ),
    json: bool = options.JSON,
) -> None:
    """Machines that carry the GPUs asked for, cheapest first."""

    from mlcloud.errors import UsageError
    from mlcloud.spec import catalog
    from mlcloud.spec.task import parse_gpus

    known = catalog.load()
    if provider is not None and provider not in {o.provider for o in known}:
        raise UsageError(
            f"--provider: unknown provider {provider!r}; the catalog has offers on "
            + ", ".join(sorted({o.provider for o in known}))
        )
    if live:
        _live_offers(known, parse_gpus(spec, "SPEC"), spot, provider, region, max_price, json)
        return
    found = catalog.find(
        known,
        parse_gpus(spec, "SPEC"),
        provider=provider,
        region=region,
        spot=spot,
        max_price=max_price,
    )
    if json:
        output.print_json(
            {
                "offers": [
                    {
                        "provider": o.provider,
                        "instance_type": o.instance_type,
                        "gpu": o.gpu_model,
                        "gpu_count": o.gpu_count,
                        "region": o.region,
                        "zones": list(o.zones),
                        "vcpus": o.vcpus,
                        "ram_gib": o.ram_gib,
                        "usd_per_hour": o.price(spot),
                        "on_demand_usd_per_hour": o.on_demand,
                        "spot_usd_per_hour": o.spot,
                        "note": o.note,
                    }
                    for o in found
                ]
            }
        )
        return
    output.table(
        [
            "provider",
            "region",
            "type",
            "gpus",
            "vcpus",
            "ram",
            "$/h" + (" spot" if spot else ""),
            "note",
        ],
        [
            [
                o.provider,
                o.region,
                o.instance_type,
                f"{o.gpu_model}:{o.gpu_count}",
                f"{o.vcpus:g}",
                f"{o.ram_gib:g} GiB",
                f"{o.price(spot):.2f}",
                o.note,
            ]
            for o in found
        ],
    )


def _live_offers(
    known: list,
    gpus: GpuSpec,
    spot: bool,
    provider: str | None,
    region: str | None,
    max_price: float | None,
    json: bool,
) -> None:
    """`offers --live`: the clouds with credentials here (or the one named), in the region
    named or everywhere they offer the GPUs."""
    from mlcloud.errors import UsageError
    from mlcloud.spec import offers as live
    from mlcloud.spec.plan import clouds
    from mlcloud.spec.task import Resources, TaskSpec

    names = [provider] if provider else clouds(known)
    if region is not None:
        names = [n for n in names if any((o.provider, o.region) == (n, region) for o in known)]
        if not names:
            raise UsageError(f"--region: no offer in {region!r} (`mlcloud offers SPEC` lists them)")
    task = TaskSpec(spot=spot, resources=Resources(gpus=gpus))
    now = time.time()
    places = [f"{n}:{region}" if region else n for n in names]
    found = live.offers(task, places, now=now, max_age=live.MAX_AGE_S)
    if max_price is not None:
        found = [o for o in found if o.price is not None and o.price <= max_price]

    def price_from(o) -> str:
        if o.source == live.CATALOG:
            return "catalog (no live price)"
        age = f"{(now - o.at) / 60:.0f} min ago" if now - o.at >= 60 else "now"
        return f"{o.source}, read {age}" + ("" if o.fresh(now, live.MAX_AGE_S) else " (stale)")

    if json:
        output.print_json(
            {
                "offers": [
                    {
                        "provider": o.provider,
                        "region": o.region,
                        "zone": o.zone,
                        "instance_type": o.instance_type,
                        "spot": o.spot,
                        "usd_per_hour": o.price,
                        "source": o.source,
                        "read_at": o.at,
                        "fresh": o.fresh(now, live.MAX_AGE_S),
                    }
                    for o in found
                ]
            }
        )
        return
    output.table(
        ["provider", "where", "type", "$/h" + (" spot" if spot else ""), "price"],
        [
            [
                o.provider,
                o.zone or o.region,
                o.instance_type,
                "-" if o.price is None else f"{o.price:.2f}",
                price_from(o),
            ]
            for o in found
        ],
    )


def cost(json: bool = options.JSON) -> None:
    """What each cluster has cost, torn-down ones included, with totals by provider and month."""
    from mlcloud import state
    from mlcloud.spec import cost as money

    store = state.open_store()
    intervals = store.billing()
    now = time.time()
    live = {c.uid for c in store.list_clusters()}
    by_uid: dict[str, list] = {}
    for i in intervals:
        by_uid.setdefault(i.uid, []).append(i)
    clusters = [
        {
            "name": items[0].cluster,
            "uid": uid,
            "provider": items[0].provider,
            "status": "UP" if uid in live else "DOWN",
            "usd_per_hour": round(money.hourly(items), 4),
            "usd": round(money.accrued(items, now), 4),
            "first_billed": min(i.start for i in items),
        }
        for uid, items in by_uid.items()
    ]
    months = [
        {"provider": p, "month": m, "usd": round(v, 4)}
        for (p, m), v in sorted(money.by_month(intervals, now).items())
    ]
    providers_total: dict[str, float] = {}
    for row in months:
        providers_total[row["provider"]] = providers_total.get(row["provider"], 0.0) + row["usd"]
    if json:
        output.print_json(
            {
                "clusters": clusters,
                "by_month": months,
                "by_provider": {k: round(v, 4) for k, v in providers_total.items()},
                "total_usd": round(sum(c["usd"] for c in clusters), 4),
            }
        )
        return
    if not clusters:
        print("nothing billed yet")
        return
    output.table(
        ["cluster", "provider", "status", "$/h now", "cost"],
        [
            [c["name"], c["provider"], c["status"], f"{c['usd_per_hour']:.2f}", f"{c['usd']:.2f}"]
            for c in clusters
        ],
    )
    print()
    output.table(
        ["provider", "month", "cost"],
        [[m["provider"], m["month"], f"{m['usd']:.2f}"] for m in months],
    )
    print(f"\ntotal: ${sum(c['usd'] for c in clusters):.2f}")


@catalog_app.command("show")
def catalog_show(json: bool = options.JSON) -> None:
    """Where the catalog's figures come from and how old they are."""
    from mlcloud.spec import catalog
    from mlcloud.spec.catalog.refresh import REFRESH

    header = catalog.header()
    fresh = {p: path for p in REFRESH if (path := catalog.refreshed_path(p)).exists()}
    if json:
        output.print_json(
            {
                "shipped": {
                    "path": str(catalog.SHIPPED),
                    "built": catalog.built(),
                    "header": header,
                },
                "refreshed": {p: str(path) for p, path in fresh.items()},
            }
        )
        return
    for line in header:
        print(line)
    for provider, path in fresh.items():
        print(f"{provider}: refreshed copy in use: {path}")


@catalog_app.command("refresh")
def catalog_refresh(
    provider: str | None = typer.Option(
        None,
        "--provider",
        "-p",
        help="Only this provider (aws or gce; default: each one with credentials here).",
    ),
) -> None:
    """Fetch current prices (AWS: Price List API and spot price history; GCE: Cloud Billing
    Catalog API) into $MLCLOUD_HOME; they then take the place of the shipped figures for that
    provider. Without --provider, every cloud this machine has credentials for; the others
    are named as skipped."""
    from mlcloud.errors import MlcloudError
    from mlcloud.spec import catalog
    from mlcloud.spec.catalog import refresh

    names, skipped = refresh.chosen(provider)
    for name in skipped:
        print(f"{name}: skipped, no credentials here (`--provider {name}` tries anyway)")
    failed: list[str] = []
    for name in names:  # one cloud failing does not keep the other's prices old
        try:
            refreshed, kept = refresh.refresh(name)
        except MlcloudError as e:
            failed.append(str(e))
            continue
        print(
            f"refreshed {refreshed} {name} offer(s), {kept} kept as shipped: "
            f"{catalog.refreshed_path(name)}"
        )
    if failed:
        raise MlcloudError(
            f"{'; '.join(failed)}; still using the shipped catalog: {catalog.built()}"
        )
