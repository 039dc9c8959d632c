"""Placement groups for moto's EC2, which lacks them (moto 5.2: "describe_placement_groups
action has not been implemented"). Just enough of the real API for mlcloud's calls: create
with tags, describe by name and tag filters, delete; the serializer is moto's own, driven by
botocore's shapes, so responses look like EC2's."""

from __future__ import annotations

import secrets

from moto.core.responses import ActionResult
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.responses import EC2Response

_GROUPS: dict[tuple[str, str, str], dict] = {}  # (account, region, name) -> group


def _key(resp: EC2Response, name: str) -> tuple[str, str, str]:
    return (resp.current_account, resp.region, name)


def create_placement_group(self: EC2Response) -> ActionResult:
    name = self._get_param("GroupName")
    if _key(self, name) in _GROUPS:
        raise EC2ClientError(
            "InvalidPlacementGroup.Duplicate", f"The placement group '{name}' already exists."
        )
    tags = self._parse_tag_specification().get("placement-group", {})
    group = {
        "GroupName": name,
        "Strategy": self._get_param("Strategy"),
        "State": "available",
        "GroupId": f"pg-{secrets.token_hex(8)}",
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
    }
    _GROUPS[_key(self, name)] = group
    return ActionResult({"PlacementGroup": group})


def describe_placement_groups(self: EC2Response) -> ActionResult:
    names = self._get_param("GroupNames", [])
    filters = self._filters_from_querystring()
    out = []
    for (account, region, name), group in _GROUPS.items():
        if (account, region) != (self.current_account, self.region):
            continue
        if names and name not in names:
            continue
        tags = {t["Key"]: t["Value"] for t in group["Tags"]}
        ok = True
        for fname, values in filters.items():
            if fname == "tag-key":
                ok &= any(v in tags for v in values)
            elif fname.startswith("tag:"):
                ok &= tags.get(fname[4:]) in values
            elif fname == "group-name":
                ok &= name in values
        if ok:
            out.append(group)
    return ActionResult({"PlacementGroups": out})


def delete_placement_group(self: EC2Response) -> ActionResult:
    name = self._get_param("GroupName")
    if _GROUPS.pop(_key(self, name), None) is None:
        raise EC2ClientError(
            "InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown."
        )
    return ActionResult({})


def install() -> None:
    """Add the calls to moto's EC2 (once per test: the groups start empty, like moto's state)."""
    _GROUPS.clear()
    EC2Response.create_placement_group = create_placement_group
    EC2Response.describe_placement_groups = describe_placement_groups
    EC2Response.delete_placement_group = delete_placement_group
