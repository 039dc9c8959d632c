"""Live offers (mlcloud/spec/offers.py) from the clouds' own price APIs, with the real clients:
EC2 Spot per zone from DescribeSpotPriceHistory (the moto server behind the stand-in, which
lets a test set a zone's price) and GCE from the Cloud Billing Catalog (the fake, whose prices
a test changes); the cache and its age, a cloud that cannot be asked, the placements' checks,
and a price spike that makes a move for price."""

from __future__ import annotations

import json

import pytest
from mlcloud.cli.app import run

from mlcloud.control.moves import decide_move
from mlcloud.errors import UsageError
from mlcloud.spec import catalog
from mlcloud.spec.offers import (
    CACHED,
    CATALOG,
    LIVE,
    check_placements,
    offer_at,
    offers,
    parse_placement,
)
from mlcloud.spec.task import GpuSpec, Resources, TaskSpec

NOW = 1_800_000_000.0
MAX_AGE = 600.0
P4D = TaskSpec(provider="aws", spot=True, resources=Resources(instance_type="p4d.24xlarge"))
A100 = TaskSpec(provider="aws", spot=True, resources=Resources(gpus=GpuSpec("A100", 8)))
T4 = TaskSpec(provider="gce", spot=True, resources=Resources(gpus=GpuSpec("T4", 1)))


def test_placements_are_checked_and_kept_as_written():
    assert check_placements(["aws", "aws:us-east-1", "aws:us-east-1a", "gce:europe-west4-b"]) == (
        "aws",
        "aws:us-east-1",
        "aws:us-east-1a",
        "gce:europe-west4-b",
    )
    z = parse_placement("gce:europe-west4-b")
    assert (z.provider, z.region, z.zone) == ("gce", "europe-west4", "europe-west4-b")
    assert check_placements(["aws", "aws"]) == ("aws",)


@pytest.mark.parametrize(
    "value, says",
    [
        ("azure", "'azure' names no cloud with offers; write CLOUD, CLOUD:REGION or CLOUD:ZONE"),
        ("local", "'local' names no cloud with offers"),
        ("aws:mars-east-1", "aws has no offer in a region or zone 'mars-east-1'"),
        ("aws:us-east-1-", "aws has no offer in a region or zone 'us-east-1-'"),
        ("aws:", "aws has no offer in a region or zone ''"),
        ("AWS", "'AWS' names no cloud with offers"),
        (7, "7 is not CLOUD, CLOUD:REGION or CLOUD:ZONE"),
    ],
)
def test_a_bad_placement_is_one_line_naming_it(value, says):
    with pytest.raises(UsageError) as e:
        check_placements([value], "mlcloud.yaml:9 recover.placements")
    assert str(e.value).startswith("mlcloud.yaml:9 recover.placements: ") and says in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="empty"):
        check_placements([])
    with pytest.raises(UsageError, match="'aws' is not a list"):
        check_placements("aws")


def test_ec2_spot_prices_per_zone_cheapest_first_cached_with_their_time(
    moto_server, ec2_stand_in, mlcloud_home
):
    ec2_stand_in.set_spot_price("us-east-1a", "p4d.24xlarge", 9.0)
    ec2_stand_in.set_spot_price("us-east-1b", "p4d.24xlarge", 4.5)
    ec2_stand_in.set_spot_price("us-east-1c", "p4d.24xlarge", 6.0)
    found = offers(P4D, ["aws:us-east-1"], now=NOW, max_age=MAX_AGE)
    mine = [o for o in found if o.zone in ("us-east-1a", "us-east-1b", "us-east-1c")]
    assert [(o.zone, o.price) for o in mine] == [
        ("us-east-1b", 4.5),
        ("us-east-1c", 6.0),
        ("us-east-1a", 9.0),
    ]
    assert {o.region for o in found} == {"us-east-1"} and len(found) > 3  # moto has more zones
    assert all(o.source == LIVE and o.at == NOW and o.spot for o in found)
    assert [o.price for o in found] == sorted(o.price for o in found)
    cached = json.loads((mlcloud_home / "cache" / "prices.json").read_text())
    assert cached[0]["at"] == NOW and cached[0]["zones"]["us-east-1b"] == 4.5

    ec2_stand_in.set_spot_price("us-east-1b", "p4d.24xlarge", 20.0)  # a spike
    zone = ["aws:us-east-1b"]
    again = offers(P4D, zone, now=NOW + 60, max_age=MAX_AGE)  # young enough: not asked
    assert [(o.place, o.price, o.source, o.at) for o in again] == [
        ("aws:us-east-1b", 4.5, CACHED, NOW)
    ]
    later = offers(P4D, zone, now=NOW + MAX_AGE / 2, max_age=MAX_AGE)  # half of max_age: asked
    assert [(o.price, o.source, o.at) for o in later] == [(20.0, LIVE, NOW + MAX_AGE / 2)]


def test_a_cloud_that_cannot_be_asked_leaves_marked_prices_that_never_move(
    moto_server, ec2_stand_in, mlcloud_home, monkeypatch
):
    ec2_stand_in.set_spot_price("us-east-1a", "p4d.24xlarge", 9.0)
    offers(P4D, ["aws:us-east-1a"], now=NOW, max_age=MAX_AGE)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    late = NOW + 2 * MAX_AGE
    (cached,) = offers(P4D, ["aws:us-east-1a"], now=late, max_age=MAX_AGE)
    assert (cached.price, cached.source, cached.at) == (9.0, CACHED, NOW)
    assert not cached.fresh(late, MAX_AGE)
    # a region never read: the catalog's figure, no live price
    (shipped,) = offers(P4D, ["aws:us-east-2"], now=late, max_age=MAX_AGE)
    want = catalog.lookup(catalog.load(), "aws", "p4d.24xlarge", "us-east-2").spot
    assert (shipped.price, shipped.source, shipped.at, shipped.zone) == (want, CATALOG, None, None)
    cheaper = decide_move(
        cached,
        shipped,
        savings=0.3,
        resume_s=60,
        since_checkpoint_s=0,
        remaining_s=None,
        nodes=1,
        now=late,
        max_age=MAX_AGE,
    )
    assert not cheaper.go and "stale" in cheaper.reason


def test_gce_spot_prices_from_the_billing_catalog_follow_a_change(
    gce_env, mlcloud_home, monkeypatch
):
    monkeypatch.setenv("MLCLOUD_GCE_BILLING_ENDPOINT", gce_env.url)
    places = ["gce:us-central1", "gce:europe-west4-a"]
    found = offers(T4, places, now=NOW, max_age=MAX_AGE)
    shipped = {o.region: o.spot for o in catalog.load() if o.instance_type == "n1-standard-8+T4:1"}
    by = {(o.instance_type, o.region, o.zone): o for o in found}
    eu = by[("n1-standard-8+T4:1", "europe-west4", "europe-west4-a")]  # the zone as named
    us = by[("n1-standard-8+T4:1", "us-central1", None)]  # GCE prices the region as one
    assert eu.price == pytest.approx(shipped["europe-west4"], rel=1e-3) and eu.source == LIVE
    assert us.price == pytest.approx(shipped["us-central1"], rel=1e-3)
    assert {o.region for o in found} == {"us-central1", "europe-west4"}
    assert all(o.provider == "gce" and o.at == NOW for o in found)

    (mlcloud_home / "cache" / "prices.json").write_text("{damaged")  # asked again
    gce_env.fake.set_price("us-central1", "Nvidia Tesla T4 GPU", 3.0, usage="Preemptible")
    later = offers(T4, places, now=NOW + 1, max_age=MAX_AGE)
    spiked = next(
        o for o in later if o.region == "us-central1" and o.instance_type == us.instance_type
    )
    assert spiked.price == pytest.approx(8 * 0.00664 + 30 * 0.00089 + 3.0)  # N1 Spot rates
    assert later[0].region == "europe-west4"


def test_an_ec2_spike_makes_a_move_to_gce(
    moto_server, ec2_stand_in, gce_env, mlcloud_home, monkeypatch
):
    """A100:8 on Spot: p4d.24xlarge in us-east-1a until its price spikes, then the live
    offers put GCE's a2-highgpu-8g first and the rule moves the job there."""
    monkeypatch.setenv("MLCLOUD_GCE_BILLING_ENDPOINT", gce_env.url)
    places = ["aws:us-east-1a", "gce:europe-west4"]
    ec2_stand_in.set_spot_price("us-east-1a", "p4d.24xlarge", 5.0)
    first = offers(A100, places, now=NOW, max_age=MAX_AGE)
    current = first[0]
    assert (current.place, current.instance_type, current.price) == (
        "aws:us-east-1a",
        "p4d.24xlarge",
        5.0,
    )
    ec2_stand_in.set_spot_price("us-east-1a", "p4d.24xlarge", 40.0)
    now = NOW + MAX_AGE
    after = offers(A100, places, now=now, max_age=MAX_AGE)
    best = after[0]
    assert (best.place, best.instance_type, best.source) == (
        "gce:europe-west4",
        "a2-highgpu-8g",
        LIVE,
    )
    current = offer_at(after, "aws", "us-east-1", "us-east-1a", "p4d.24xlarge")
    assert current.price == 40.0 and current.zone == "us-east-1a"
    in_a_zone = offer_at(after, "gce", "europe-west4", "europe-west4-b", "a2-highgpu-8g")
    assert in_a_zone == best  # GCE prices the region as one
    assert offer_at(after, "gce", "us-central1", None, "a2-highgpu-8g") is None  # not allowed
    move = decide_move(
        current,
        best,
        savings=0.3,
        resume_s=90,
        since_checkpoint_s=30,
        remaining_s=3 * 3600,
        nodes=2,
        now=now,
        max_age=MAX_AGE,
    )
    assert (
        move.go
        and move.reason.startswith("move: gce:europe-west4 at $")
        and "$80.00/h" in move.reason
    )


def test_offers_need_a_gpu_ask(mlcloud_home):
    with pytest.raises(UsageError, match="need a GPU ask"):
        offers(TaskSpec(provider="aws"), ["aws"], now=NOW, max_age=MAX_AGE)


def test_offers_live_lists_todays_prices_with_their_source(
    moto_server, ec2_stand_in, mlcloud_home, capsys
):
    ec2_stand_in.set_spot_price("us-east-1a", "p4d.24xlarge", 7.25)
    ask = ["offers", "A100:8", "--spot", "--live", "--provider", "aws", "--region", "us-east-1"]
    assert run([*ask, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["offers"]
    a = next(r for r in rows if r["zone"] == "us-east-1a")
    assert (a["instance_type"], a["usd_per_hour"], a["source"], a["fresh"]) == (
        "p4d.24xlarge",
        7.25,
        "live",
        True,
    )
    assert run([*ask, "--max-price", "8"]) == 0
    out = capsys.readouterr().out
    assert "us-east-1a" in out and "7.25" in out and "cache, read now" in out  # cached now

    assert run([*ask[:-1], "mars-east-1"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --region: no offer in 'mars-east-1' (`mlcloud offers SPEC` lists them)\n"


def test_spot_skus_are_read_in_both_of_googles_namings():
    """GCE names a Spot part "Spot Preemptible N1 ... Core" but a Spot GPU "Nvidia Tesla T4
    GPU attached to Spot Preemptible VMs"; the on-demand SKU of the same part never serves."""
    from mlcloud.providers.gce.billing import _rate

    def sku(description, usd, usage):
        price = {"units": "0", "nanos": round(usd * 1e9)}
        return {
            "description": description,
            "category": {"usageType": usage},
            "serviceRegions": ["us-central1"],
            "pricingInfo": [{"pricingExpression": {"tieredRates": [{"unitPrice": price}]}}],
        }

    skus = [
        sku("Nvidia Tesla T4 GPU running in Americas", 0.35, "OnDemand"),
        sku(
            "Nvidia Tesla T4 GPU attached to Spot Preemptible VMs running in Americas",
            0.14,
            "Preemptible",
        ),
        sku(
            "Spot Preemptible N1 Predefined Instance Core running in Americas", 0.007, "Preemptible"
        ),
    ]
    gpu, core = r"Nvidia (Tesla )?T4 GPU", r"N1 (Predefined )?Instance Core"
    assert _rate(skus, gpu, "us-central1", "Preemptible") == pytest.approx(0.14)
    assert _rate(skus, gpu, "us-central1", "OnDemand") == pytest.approx(0.35)
    assert _rate(skus, core, "us-central1", "Preemptible") == pytest.approx(0.007)
    assert _rate(skus, core, "us-central1", "OnDemand") is None
