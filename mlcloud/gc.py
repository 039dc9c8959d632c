"""Orphan discovery: cloud resources that carry mlcloud's tags but whose cluster local state
no longer knows (a lost laptop, a wiped $MLCLOUD_HOME, a crash between create and record)."""

from __future__ import annotations

from mlcloud import providers, state
from mlcloud.errors import UsageError
from mlcloud.providers.base import Resource

CLOUDS = ("aws",)  # the providers that can list what they hold by tag


def orphans(
    store: state.Store, provider: str | None, regions: list[str], owner: str | None
) -> list[Resource]:
    """Tagged resources of clusters not in state; only `owner`'s unless owner is None, so
    a teammate's clusters, which this machine's state never knew, are left alone."""
    names = [provider] if provider else list(CLOUDS)
    known = {c.uid for c in store.list_clusters()}
    found: list[Resource] = []
    for name in names:
        p = providers.get(name)
        if not hasattr(p, "discover"):
            raise UsageError(f"provider {name!r} holds no cloud resources to collect")
        for region in regions or [None]:
            found += [
                r
                for r in p.discover(region)
                if r.cluster_uid not in known and (owner is None or r.owner == owner)
            ]
    return found


def delete(resources: list[Resource]) -> None:
    by_provider: dict[str, list[Resource]] = {}
    for r in resources:
        by_provider.setdefault(r.provider, []).append(r)
    for name, items in by_provider.items():
        providers.get(name).delete(items)
