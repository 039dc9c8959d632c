"""Live offers: where a spec's nodes could run among the allowed placements, and what a node
costs there now, cheapest first (for managed jobs' new clusters and moves for price:
docs/architecture.md, "Live prices").

The catalog (mlcloud/spec/catalog) says which instance types carry the spec's GPUs and where;
each cloud's own API says today's price (the provider contract's `quotes`: EC2 Spot per zone
from DescribeSpotPriceHistory, GCE per region from the Cloud Billing Catalog). Every price read
is cached with the time it was read (`cache/prices.json` in the home, or on the shared store),
and asked again once it is older than half of `max_age`. A cloud that cannot be asked leaves
its cached prices, whose age shows, or the catalog's figure, marked as no live price: neither
ever drives a move (mlcloud/control/moves.py checks).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mlcloud.errors import MlcloudError, UsageError
from mlcloud.spec import catalog
from mlcloud.spec.task import GpuSpec, TaskSpec

CACHE = "cache/prices.json"
MAX_AGE_S = 900.0  # `offers --live`: a price older than this is stale
LIVE, CACHED, CATALOG = "live", "cache", "catalog"  # Offer.source: where its price came from
_NAME = re.compile(r"[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class Offer:
    """One place a node could run, and its price in USD per node-hour."""

    provider: str
    region: str
    zone: str | None  # None: any zone of the region (the cloud prices the region as one)
    instance_type: str
    spot: bool
    price: float | None  # None: neither the cloud nor the catalog has a figure
    at: float | None  # epoch s the price was read from the cloud; None: the catalog's figure
    source: str  # LIVE (read by this call), CACHED (read earlier: see `at`), CATALOG

    @property
    def place(self) -> str:
        """As placements are written: `aws:us-east-1a`, `gce:europe-west4`."""
        return f"{self.provider}:{self.zone or self.region}"

    def fresh(self, now: float, max_age: float) -> bool:
        """Whether the price is live and no older than max_age: only such a price may drive
        a move."""
        return self.price is not None and self.at is not None and 0 <= now - self.at <= max_age


@dataclass(frozen=True)
class Placement:
    """A checked `CLOUD`, `CLOUD:REGION` or `CLOUD:ZONE`."""

    provider: str
    region: str | None = None
    zone: str | None = None

    def __str__(self) -> str:
        return ":".join(x for x in (self.provider, self.zone or self.region) if x)

    def allows(self, provider: str, region: str, zone: str | None) -> bool:
        return (
            provider == self.provider
            and self.region in (None, region)
            and (self.zone is None or zone in (None, self.zone))
        )


def check_placements(
    values: Iterable[object], where: str = "recover.placements"
) -> tuple[str, ...]:
    """The placements as written, each checked (a UsageError naming `where` and the value
    otherwise): for the spec's `recover.placements`."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise UsageError(f"{where}: {values!r} is not a list; write e.g. [aws, gce:europe-west4]")
    out = tuple(str(parse_placement(v, where)) for v in values)
    if not out:
        raise UsageError(f"{where}: empty; name at least one, e.g. [aws, gce:europe-west4]")
    return tuple(dict.fromkeys(out))


def parse_placement(value: object, where: str = "recover.placements") -> Placement:
    """`CLOUD`, `CLOUD:REGION` or `CLOUD:ZONE`: a cloud the catalog prices, one of its regions
    there, or a zone of one (the region's name and a letter: us-east-1a, europe-west4-b)."""
    if not isinstance(value, str):
        raise UsageError(f"{where}: {value!r} is not CLOUD, CLOUD:REGION or CLOUD:ZONE")
    provider, colon, rest = value.strip().partition(":")
    known = catalog.load()
    rows = [o for o in known if o.provider == provider]
    if not _NAME.fullmatch(provider) or not rows:
        clouds = sorted({o.provider for o in known})
        raise UsageError(
            f"{where}: {value!r} names no cloud with offers; write CLOUD, CLOUD:REGION or "
            f"CLOUD:ZONE with CLOUD one of {', '.join(clouds)}"
        )
    if not colon:
        return Placement(provider)
    regions = {o.region for o in rows}
    if rest in regions:
        return Placement(provider, rest)
    zone = re.fullmatch(r"(.+?)-?[a-z]", rest)
    if zone and zone.group(1) in regions:
        return Placement(provider, zone.group(1), rest)
    near = sorted(r for r in regions if r[:6] == rest[:6]) or sorted(regions)
    raise UsageError(
        f"{where}: {value!r}: {provider} has no offer in a region or zone {rest!r}; "
        f"regions: {', '.join(near[:6])}{' ...' if len(near) > 6 else ''}"
    )


def offers(spec: TaskSpec, placements: Iterable[str], *, now: float, max_age: float) -> list[Offer]:
    """The offers that fit the spec's nodes in the placements (none named: anywhere on the
    spec's provider), cheapest first, those without a price last. Asks each cloud whose
    cached prices are missing or older than max_age / 2, and caches its answers."""
    places = [parse_placement(p) for p in placements]
    if not places and spec.provider:
        places = [parse_placement(spec.provider, "the spec's provider")]
    rows = [
        o
        for o in _shapes(spec, sorted({p.provider for p in places}))
        if any(p.allows(o.provider, o.region, None) for p in places)
    ]
    cache = _read_cache()
    asked: set[tuple] = set()
    for provider in sorted({o.provider for o in rows}):
        pairs = sorted({(o.instance_type, o.region) for o in rows if o.provider == provider})
        due = [
            pair
            for pair in pairs
            if not (hit := cache.get((provider, *pair, spec.spot))) or now - hit[0] >= max_age / 2
        ]
        if due and (answer := _ask(provider, due, spec.spot)) is not None:
            for pair in due:
                cache[(provider, *pair, spec.spot)] = (now, {})
                asked.add((provider, *pair))
            for q in answer:
                if (q.instance_type, q.region) in due:
                    cache[(provider, q.instance_type, q.region, spec.spot)][1][q.zone] = q.price
    if asked:
        _write_cache(cache)
    found: list[Offer] = []
    for o in rows:
        at, zones = cache.get((o.provider, o.instance_type, o.region, spec.spot), (None, {}))
        source = LIVE if (o.provider, o.instance_type, o.region) in asked else CACHED
        priced = [(z, usd, at, source) for z, usd in zones.items()]
        for zone, usd, when, src in priced or [(None, o.price(spec.spot), None, CATALOG)]:
            for p in places:
                if p.allows(o.provider, o.region, zone):
                    where = zone or p.zone  # a zone named where the cloud prices regions
                    found.append(
                        Offer(
                            o.provider, o.region, where, o.instance_type, spec.spot, usd, when, src
                        )
                    )
    if spec.spot and spec.spot_max_price is not None:
        found = [o for o in found if o.price is None or o.price <= spec.spot_max_price]
    return sorted(
        dict.fromkeys(found),
        key=lambda o: (o.price is None, o.price or 0.0, o.provider, o.region, o.zone or ""),
    )


def offer_at(
    found: Iterable[Offer], provider: str, region: str, zone: str | None, instance_type: str
) -> Offer | None:
    """The offer of a cluster that runs there (its current price, for `decide_move`): its
    zone's, else its region's where the cloud prices the region as one."""
    mine = [
        o
        for o in found
        if (o.provider, o.region, o.instance_type) == (provider, region, instance_type)
        and o.zone in (zone, None)
    ]
    return next((o for o in mine if o.zone == zone), mine[0] if mine else None)


def _shapes(spec: TaskSpec, providers: list[str]) -> list[catalog.Offer]:
    """The catalog's rows that fit the spec on those providers: its GPUs (or the GPUs of its
    instance type, on other clouds), its instance type on its own provider, with a Spot
    figure when it asks for Spot."""
    rows = [o for o in catalog.load() if o.provider in providers]
    itype = spec.resources.instance_type
    gpus = spec.resources.gpus
    if gpus is None and itype:
        shape = next((o for o in catalog.load() if o.instance_type == itype), None)
        if shape is None:
            raise UsageError(f"{itype} is not in the catalog: no offers to compare it with")
        gpus = GpuSpec(shape.gpu_model, shape.gpu_count)
    if gpus is None:
        raise UsageError(
            "live offers need a GPU ask (resources.gpus) or an instance type in the catalog"
        )
    fits = catalog.find(rows, gpus, spot=spec.spot)
    own = spec.provider if itype else None
    return [o for o in fits if o.provider != own or o.instance_type == itype]


def _ask(provider: str, pairs: list[tuple[str, str]], spot: bool) -> list | None:
    """The cloud's quotes, or None when it cannot be asked now (its cached prices serve)."""
    from mlcloud import providers

    try:
        return providers.get(provider).quotes(pairs, spot)
    except MlcloudError:
        return None


def _read_cache() -> dict[tuple, tuple[float, dict[str | None, float]]]:
    """(provider, instance type, region, spot) -> (when read, zone -> USD/h; zone None: the
    region's price); a damaged cache is an empty one (it is asked again)."""
    from mlcloud.state import files

    try:
        rows = json.loads(files.read(CACHE) or b"[]")
        return {
            (r["provider"], r["instance_type"], r["region"], bool(r["spot"])): (
                float(r["at"]),
                {z or None: float(usd) for z, usd in r["zones"].items()},
            )
            for r in rows
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_cache(cache: dict[tuple, tuple[float, dict[str | None, float]]]) -> None:
    """Whole; of two writers at once the last one's stands (the other's prices are asked for
    again when next needed)."""
    from mlcloud.state import files

    rows = [
        {
            "provider": provider,
            "instance_type": itype,
            "region": region,
            "spot": spot,
            "at": at,
            "zones": {z or "": usd for z, usd in zones.items()},
        }
        for (provider, itype, region, spot), (at, zones) in sorted(
            cache.items(), key=lambda kv: tuple(map(str, kv[0]))
        )
    ]
    files.write(CACHE, json.dumps(rows, indent=1).encode())
