"""The plan shown before `up`: which provider, region and type, and what it costs per hour.

A GPU ask (`--gpus A100:8`) without an instance type is resolved here to the cheapest offer
that meets the constraints, among the clouds mlcloud can provision."""

from __future__ import annotations

from dataclasses import dataclass, replace

from mlcloud.errors import UsageError
from mlcloud.spec import catalog
from mlcloud.spec.locality import DataPlace, egress_per_gb
from mlcloud.spec.task import TaskSpec

MAX_FALLBACK_REGIONS = 3  # regions tried after the cheapest one has no capacity


@dataclass(frozen=True)
class Plan:
    provider: str
    region: str | None
    instance_type: str | None
    gpus: str | None
    nodes: int
    spot: bool
    price_per_node: float | None  # USD/h; None when the catalog does not know the type
    max_hours: float | None = None
    data_region: str | None = None  # --near: where the data is
    egress_usd_per_gb: float | None = None  # reading it from the chosen region
    fallback_regions: tuple[str, ...] = ()  # the same type, next cheapest first

    @property
    def per_hour(self) -> float | None:
        return None if self.price_per_node is None else self.price_per_node * self.nodes

    @property
    def for_max_hours(self) -> float | None:
        if self.per_hour is None or self.max_hours is None:
            return None
        return self.per_hour * self.max_hours

    def to_dict(self) -> dict:
        return {
            "provider": self.provider,
            "region": self.region,
            "instance_type": self.instance_type,
            "gpus": self.gpus,
            "nodes": self.nodes,
            "spot": self.spot,
            "usd_per_hour_per_node": self.price_per_node,
            "usd_per_hour": self.per_hour,
            "max_hours": self.max_hours,
            "usd_for_max_hours": self.for_max_hours,
            "data_region": self.data_region,
            "egress_usd_per_gb": self.egress_usd_per_gb,
        }


def priced(provider: str) -> bool:
    """Whether the provider's nodes are machines mlcloud pays for (a cloud's), so a plan has a
    price; this machine and the user's hosts are paid for already."""
    from mlcloud import providers

    return providers.get(provider).capabilities.owns_machines


def clouds(offers: list[catalog.Offer]) -> list[str]:
    """Providers that can take a GPU ask: in the catalog and installed, and of those the ones
    this machine has credentials for when it has any (an AWS user asking for A100:8 is not
    sent to a cheaper cloud they cannot use)."""
    from mlcloud import providers

    in_catalog = sorted({o.provider for o in offers} & set(providers.names()))
    usable = [name for name in in_catalog if providers.get(name).configured()]
    return usable or in_catalog


def make(
    spec: TaskSpec,
    default_region,
    max_hours: float | None = None,
    near: DataPlace | None = None,
) -> tuple[TaskSpec, Plan]:
    """(the spec with provider, region and type filled in, the plan); default_region(provider)
    gives the provider's configured region when the spec names none; near is where the data is.
    """
    provider = spec.provider or ("cloud" if spec.resources.gpus else "local")
    gpus = str(spec.resources.gpus) if spec.resources.gpus else None
    n = spec.node_count
    if provider != "cloud" and not priced(provider):
        return spec, Plan(provider, None, None, gpus, n, False, 0.0, max_hours)
    if provider == "cloud" and spec.resources.instance_type:
        raise UsageError(
            f"instance type {spec.resources.instance_type} needs a provider: "
            "add --provider aws (or leave the type out and let --gpus choose)"
        )
    offers = catalog.load()
    if spec.resources.gpus is not None and not spec.resources.instance_type:
        allowed = clouds(offers) if provider == "cloud" else [provider]
        candidates = catalog.find(
            [o for o in offers if o.provider in allowed],
            spec.resources.gpus,
            region=spec.region,
            spot=spec.spot,
            max_price=spec.spot_max_price if spec.spot else None,
        )
        best = candidates[0]
        if near is not None:  # compute goes to the data when the data's region has an offer
            there = [
                o
                for o in candidates
                if o.region == near.region and near.provider in (None, o.provider)
            ]
            best = there[0] if there else best
        spec = replace(
            spec,
            provider=best.provider,
            region=best.region,
            resources=replace(spec.resources, instance_type=best.instance_type),
        )
        fallbacks = tuple(
            dict.fromkeys(
                o.region
                for o in candidates
                if o.provider == best.provider
                and o.instance_type == best.instance_type
                and o.region != best.region
            )
        )[:MAX_FALLBACK_REGIONS]
        return spec, Plan(
            best.provider,
            best.region,
            best.instance_type,
            gpus,
            n,
            spec.spot,
            best.price(spec.spot),
            max_hours,
            *_data(near, best.provider, best.region),
            fallbacks,
        )
    region = spec.region or default_region(provider)
    offer = catalog.lookup(offers, provider, spec.resources.instance_type or "", region or "")
    price = offer.price(spec.spot) if offer else None
    gpus = gpus or (f"{offer.gpu_model}:{offer.gpu_count}" if offer else None)
    return spec, Plan(
        provider,
        region,
        spec.resources.instance_type,
        gpus,
        n,
        spec.spot,
        price,
        max_hours,
        *_data(near, provider, region or ""),
    )


def _data(near: DataPlace | None, provider: str, region: str) -> tuple:
    if near is None:
        return None, None
    return near.region, egress_per_gb(near, provider, region)
