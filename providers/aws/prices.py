"""EC2 prices for `mlcloud catalog refresh` and live offers: on demand from the Price List
API, Spot per zone from the spot price history."""

from __future__ import annotations

from mlcloud.providers.aws.api import Api, sdk_errors


def on_demand(api: Api, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """(instance type, region) -> on-demand $/h from the Price List API, where it has one."""
    import json

    from botocore.config import Config

    wanted = set(pairs)
    with sdk_errors("client", "us-east-1"):
        pricing = api.session.client(
            "pricing",
            region_name="us-east-1",  # the Price List API lives in us-east-1
            config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5),
        )
    found: dict[tuple[str, str], float] = {}
    for itype in sorted({t for t, _ in wanted}):
        token = None
        while True:
            page = api.call_client(
                pricing,
                "get_products",
                ServiceCode="AmazonEC2",
                Filters=[
                    _term(k, v)
                    for k, v in (
                        ("instanceType", itype),
                        ("operatingSystem", "Linux"),
                        ("tenancy", "Shared"),
                        ("preInstalledSw", "NA"),
                        ("capacitystatus", "Used"),
                    )
                ],
                **({"NextToken": token} if token else {}),
            )
            for raw in page.get("PriceList", []):
                item = json.loads(raw)
                region = item["product"]["attributes"].get("regionCode", "")
                for term in item.get("terms", {}).get("OnDemand", {}).values():
                    for dim in term.get("priceDimensions", {}).values():
                        usd = float(dim.get("pricePerUnit", {}).get("USD", 0) or 0)
                        if usd > 0 and (itype, region) in wanted:
                            found[(itype, region)] = usd
            token = page.get("NextToken")
            if not token:
                break
    return found


def spot_by_zone(api: Api, pairs: list[tuple[str, str]]) -> dict[tuple[str, str, str], float]:
    """(instance type, region, zone) -> the zone's latest spot price, from
    DescribeSpotPriceHistory (EC2 prices Spot per zone), where AWS has one."""
    from datetime import datetime, timezone

    wanted = set(pairs)
    found: dict[tuple[str, str, str], float] = {}
    for region in sorted({r for _, r in wanted}):
        types = sorted({t for t, r in wanted if r == region})
        latest: dict[tuple[str, str], tuple[datetime, float]] = {}
        for h in api.paged(
            region,
            "describe_spot_price_history",
            "SpotPriceHistory",
            InstanceTypes=types,
            ProductDescriptions=["Linux/UNIX"],
            StartTime=datetime.now(timezone.utc),
        ):
            key = (h["InstanceType"], h["AvailabilityZone"])
            if key not in latest or h["Timestamp"] > latest[key][0]:
                latest[key] = (h["Timestamp"], float(h["SpotPrice"]))
        for (itype, zone), (_, price) in latest.items():
            if itype in types:
                found[(itype, region, zone)] = price
    return found


def _term(field: str, value: str) -> dict:
    return {"Type": "TERM_MATCH", "Field": field, "Value": value}
