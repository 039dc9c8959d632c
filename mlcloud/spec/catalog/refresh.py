"""`mlcloud catalog refresh`: fresh prices from the provider's own APIs, written beside the
shipped catalog (in $MLCLOUD_HOME), where they then win for that provider."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from mlcloud.spec.catalog import COLUMNS, SHIPPED, Offer, built, read, refreshed_path

if TYPE_CHECKING:
    from mlcloud.providers.base import Provider


def refresh_aws(provider: Provider, now: datetime | None = None) -> tuple[int, int]:
    """(rows refreshed, rows kept as shipped); writes the refreshed AWS catalog."""
    import statistics

    now = now or datetime.now(timezone.utc)
    rows = [o for o in read(SHIPPED) if o.provider == "aws"]
    pairs = sorted({(o.instance_type, o.region) for o in rows})
    prices, zones = provider.prices(pairs), provider.quotes(pairs, True)
    spots = {  # a region's figure: the median of its zones' latest
        pair: statistics.median(q.price for q in zones if (q.instance_type, q.region) == pair)
        for pair in {(q.instance_type, q.region) for q in zones}
    }
    fresh: list[Offer] = []
    refreshed = 0
    for o in rows:
        on_demand = prices.get((o.instance_type, o.region))
        spot = spots.get((o.instance_type, o.region))
        if on_demand is None:
            fresh.append(replace(o, note=(o.note + "; " if o.note else "") + "not refreshed"))
            continue
        refreshed += 1
        fresh.append(
            replace(
                o,
                on_demand=on_demand,
                spot=min(spot, on_demand) if spot is not None else o.spot,
                note=f"refreshed {now:%Y-%m-%d}",
            )
        )
    _write(
        "aws",
        [
            f"AWS rows refreshed on {now:%Y-%m-%d %H:%M} UTC from the AWS Price List API "
            "(on-demand, Linux, shared tenancy) and DescribeSpotPriceHistory (median of the "
            "latest price per zone).",
            "Rows the APIs did not price keep the shipped figures, noted 'not refreshed'.",
        ],
        fresh,
    )
    return refreshed, len(rows) - refreshed


def refresh_gce(provider: Provider, now: datetime | None = None) -> tuple[int, int]:
    """(rows refreshed, rows kept as shipped); writes the refreshed GCE catalog. Only
    on-demand prices: Spot figures stay as shipped."""
    now = now or datetime.now(timezone.utc)
    rows = [o for o in read(SHIPPED) if o.provider == "gce"]
    prices = provider.prices(sorted({(o.instance_type, o.region) for o in rows}))
    fresh = [
        replace(o, on_demand=prices[(o.instance_type, o.region)], note=f"refreshed {now:%Y-%m-%d}")
        if (o.instance_type, o.region) in prices
        else replace(o, note=(o.note + "; " if o.note else "") + "not refreshed")
        for o in rows
    ]
    _write(
        "gce",
        [
            f"GCE rows refreshed on {now:%Y-%m-%d %H:%M} UTC from the Cloud Billing Catalog API "
            "(on-demand vCPU, memory and GPU SKUs of the region; Spot kept as shipped).",
            "Rows the API did not price keep the shipped figures, noted 'not refreshed'.",
        ],
        fresh,
    )
    return len(prices), len(rows) - len(prices)


REFRESH = {"aws": refresh_aws, "gce": refresh_gce}  # the providers whose APIs price offers


def chosen(named: str | None) -> tuple[list[str], list[str]]:
    """(the providers to refresh, those skipped for want of credentials here): the one named;
    else each one this machine has credentials for (`configured()`: no network call). None
    at all is an AuthError: nothing would be refreshed."""
    from mlcloud import providers
    from mlcloud.errors import UsageError
    from mlcloud.providers.base import AuthError

    if named is not None:
        if named not in REFRESH:
            raise UsageError(
                f"refresh is available for {' and '.join(REFRESH)}; {named!r} uses the "
                "shipped figures"
            )
        return [named], []
    ready = {name: providers.get(name).configured() for name in REFRESH}
    names = [n for n, ok in ready.items() if ok]
    if not names:
        raise AuthError(
            f"no credentials here for {' or '.join(REFRESH)} (environment or credential files): "
            "nothing refreshed; configure one, or name it with --provider to try anyway"
        )
    return names, [n for n, ok in ready.items() if not ok]


def refresh(name: str) -> tuple[int, int]:
    """(rows refreshed, rows kept as shipped) of one provider; a failure is an MlcloudError
    naming the provider."""
    from mlcloud import providers
    from mlcloud.errors import MlcloudError

    try:
        return REFRESH[name](providers.get(name))
    except MlcloudError as e:
        raise MlcloudError(f"could not refresh {name} prices ({e})") from None


def _write(provider: str, lines: list[str], offers: list[Offer]) -> None:
    """The provider's refreshed catalog, atomically, with where its figures came from."""
    out = io.StringIO()
    for line in [*lines, f"Shipped catalog: {built()}"]:
        out.write(f"# {line}\n")
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    for o in sorted(offers, key=lambda o: (o.instance_type, o.region)):
        w.writerow(
            [
                o.provider,
                o.instance_type,
                o.gpu_model,
                o.gpu_count,
                f"{o.gpu_memory_gib:g}",
                f"{o.vcpus:g}",
                f"{o.ram_gib:g}",
                o.region,
                ";".join(o.zones),
                f"{o.on_demand:.6f}",
                "" if o.spot is None else f"{o.spot:.6f}",
                o.note,
            ]
        )
    from mlcloud.state import atomic

    path = refreshed_path(provider)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh temporary (never a symlink standing at a fixed name), renamed over the file
    atomic.write(path, out.getvalue().encode(), mode=0o644)
