"""Orphan collection: resources that a provider finds without state (by tag in a cloud, in
this home's node directories or host registries) but whose cluster local state no longer knows
(a lost laptop, a wiped $MLCLOUD_HOME, a crash between create and record). Every registered
provider is asked, built in or a plugin's.

Other homes' clusters are never this home's orphans: another CI runner's live cluster is absent
from this state too. So an orphan is deleted only when this home made it (its owner tag is this
home's id) or the caller names its owner, and never while its cluster is younger than the
minimum age (it may still be coming up)."""

from __future__ import annotations

from dataclasses import dataclass

from mlcloud import providers, state
from mlcloud.errors import UsageError
from mlcloud.providers.base import AuthError, Provider, Resource

DELETE = "delete"


@dataclass(frozen=True)
class Orphan:
    resource: Resource
    mine: bool  # made by this home
    action: str  # DELETE, or why it is kept


@dataclass(frozen=True)
class Search:
    found: list[Resource]
    skipped: list[str]  # clouds not searched, and why (no credentials for them here)


def find(store: state.Store, provider: str | None, regions: list[str]) -> Search:
    """Every discoverable resource whose cluster this home's state does not know. Without a
    named provider, a cloud this machine has no credentials for is skipped and said, so a
    user of one cloud can gc without configuring the other."""
    names = [provider] if provider else providers.names()
    known = {c.uid for c in store.list_clusters()}
    found: list[Resource] = []
    skipped: list[str] = []
    for name in names:
        p = providers.get(name)
        try:
            found += [r for r in discover(p, regions) if r.cluster_uid not in known]
        except (AuthError, UsageError) as e:  # no credentials, no region or project
            if provider or (regions and not isinstance(e, AuthError)):
                raise
            skipped.append(f"{name}: not searched: {e}")
    return Search(found, skipped)


def discover(p: Provider, regions: list[str]) -> list[Resource]:
    """What the provider holds for any cluster, in each region asked (its default: none);
    machines mlcloud does not own (this one, the user's hosts) are in no region."""
    found: list[Resource] = []
    for region in (regions or [None]) if p.capabilities.owns_machines else [None]:
        found += p.discover(region)
    return found


def decide(
    found: list[Resource],
    me: str,
    owners: set[str] | None,
    min_age_s: float,
    now: float,
) -> list[Orphan]:
    """Which orphans may go: this home's, plus `owners`' (everyone's when owners is None),
    and only clusters none of whose resources is younger than min_age_s. Pure."""
    newest: dict[str, float] = {}
    for r in found:
        if r.created is not None:
            newest[r.cluster_uid] = max(newest.get(r.cluster_uid, 0.0), r.created)
    out = []
    for r in found:
        mine = r.owner == me
        age = now - newest.get(r.cluster_uid, float("-inf"))
        if not mine and owners is not None and r.owner not in owners:
            action = "kept: other owner (--all-owners or --owner ID to delete)"
        elif age < min_age_s:
            action = f"kept: made {int(age // 60)} min ago (--min-age to delete)"
        else:
            action = DELETE
        out.append(Orphan(r, mine, action))
    return out


def delete(orphans: list[Orphan]) -> list[Resource]:
    """Delete the orphans marked for it, grouped by provider; returns what was deleted."""
    by_provider: dict[str, list[Resource]] = {}
    for o in orphans:
        if o.action == DELETE:
            by_provider.setdefault(o.resource.provider, []).append(o.resource)
    for name, items in by_provider.items():
        providers.get(name).delete(items)
    return [r for items in by_provider.values() for r in items]
