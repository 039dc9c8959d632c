"""Resolution of GPU asks against the shipped catalog, table-driven: the chosen offer, or the
exact error; and the plan shown before `up`."""

from __future__ import annotations

import pytest

from mlcloud.errors import UsageError
from mlcloud.spec import catalog, plan
from mlcloud.spec.task import GpuSpec, Resources, TaskSpec, parse_gpus

OFFERS = catalog.load()


def cheapest(spec: str, **kw):
    return catalog.find(OFFERS, parse_gpus(spec), **kw)[0]


@pytest.mark.parametrize(
    "ask, kw, provider, instance_type, region",
    [
        ("A100:8", {"provider": "aws"}, "aws", "p4d.24xlarge", "us-east-1"),
        ("A100:8", {}, "gce", "a2-highgpu-8g", "europe-west4"),
        ("A100-80GB:8", {"provider": "aws"}, "aws", "p4de.24xlarge", None),
        ("H100:8", {"provider": "aws"}, "aws", "p5.48xlarge", None),
        ("H200:8", {"provider": "gce"}, "gce", "a3-ultragpu-8g", None),
        ("L4:1", {"provider": "aws"}, "aws", "g6.xlarge", None),
        ("L4", {"provider": "gce"}, "gce", "g2-standard-4", None),
        ("T4:1", {"provider": "gce"}, "gce", "n1-standard-8+T4:1", None),
        ("A10G:1", {}, "aws", "g5.xlarge", None),
        ("a100:8", {"provider": "aws", "region": "eu-west-1"}, "aws", "p4d.24xlarge", "eu-west-1"),
    ],
)
def test_cheapest_offer(ask, kw, provider, instance_type, region):
    o = cheapest(ask, **kw)
    assert (o.provider, o.instance_type) == (provider, instance_type)
    if region:
        assert o.region == region
    # nothing matching is cheaper
    same = [
        x
        for x in OFFERS
        if x.gpu_model == o.gpu_model
        and x.gpu_count == o.gpu_count
        and (kw.get("provider") in (None, x.provider))
    ]
    assert o.on_demand == min(x.on_demand for x in same if kw.get("region") in (None, x.region))


def test_spot_picks_by_spot_price():
    o = cheapest("A100:8", spot=True)
    spot = [x.spot for x in OFFERS if x.gpu_model == "A100" and x.gpu_count == 8 and x.spot]
    assert o.spot == min(spot) and o.spot < o.on_demand


@pytest.mark.parametrize(
    "ask, kw, message",
    [
        ("A10:8", {}, "unknown GPU 'A10'; did you mean A10G"),
        ("B300:8", {}, "unknown GPU 'B300'"),
        ("A100:3", {}, "no machine has 3 x A100; it comes 1, 2, 4, 8, 16 per machine"),
        ("H100-MEGA:8", {"provider": "aws"}, "no H100-MEGA:8 offer on aws; it is offered on gce"),
        ("A100:8", {"provider": "aws", "region": "mars-1"}, "no A100:8 offer on aws in mars-1;"),
        ("A100:8", {"max_price": 1.0}, "costs $19.42/h, above --max-price $1.00"),
        ("A100:8", {"spot": True, "max_price": 0.5}, "cheapest spot A100:8 offer"),
    ],
)
def test_impossible_asks_say_which_constraint(ask, kw, message):
    with pytest.raises(UsageError) as e:
        catalog.find(OFFERS, parse_gpus(ask), **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_plan_resolves_a_gpu_ask_to_the_cheapest_installed_cloud():
    spec = TaskSpec(provider="aws", nodes=2, resources=Resources(gpus=GpuSpec("A100", 8)))
    resolved, p = plan.make(spec, default_region=lambda provider: "us-west-2", max_hours=10)
    assert (p.provider, p.instance_type, p.region) == ("aws", "p4d.24xlarge", "us-east-1")
    assert resolved.resources.instance_type == "p4d.24xlarge" and resolved.region == "us-east-1"
    assert p.fallback_regions[:2] == ("us-east-2", "us-west-2")  # same type, next cheapest
    assert p.per_hour == pytest.approx(2 * 21.96) and p.for_max_hours == pytest.approx(439.2)
    d = p.to_dict()
    assert d["usd_per_hour"] == pytest.approx(43.92) and d["nodes"] == 2


def test_plan_prices_an_instance_type_in_the_default_region():
    spec = TaskSpec(provider="aws", resources=Resources(instance_type="g5.xlarge"))
    _, p = plan.make(spec, default_region=lambda provider: "us-east-1")
    assert p.region == "us-east-1" and p.gpus == "A10G:1" and p.price_per_node > 0


def test_plan_for_machines_already_paid_for_is_free():
    _, p = plan.make(TaskSpec(nodes=3), default_region=lambda provider: None)
    assert p.provider == "local" and p.per_hour == 0.0


def test_refreshed_rows_replace_a_providers_shipped_rows(mlcloud_home):
    fresh = catalog.refreshed_path("aws")
    fresh.parent.mkdir(parents=True)
    fresh.write_text(
        "# refreshed\n" + ",".join(catalog.COLUMNS) + "\n"
        "aws,p4d.24xlarge,A100,8,40,96,1152,us-east-1,use1-az1,20.0,9.0,\n"
    )
    offers = catalog.load()
    assert [o.on_demand for o in offers if o.provider == "aws"] == [20.0]
    assert any(o.provider == "gce" for o in offers)


def test_compute_goes_to_the_data_region_when_it_can():
    from mlcloud.spec.locality import DataPlace

    ask = TaskSpec(provider="aws", resources=Resources(gpus=GpuSpec("A100", 8)))
    _, anywhere = plan.make(ask, default_region=lambda p: None)
    _, near = plan.make(ask, default_region=lambda p: None, near=DataPlace("aws", "eu-west-1"))
    assert (near.provider, near.region) == ("aws", "eu-west-1") and near.egress_usd_per_gb == 0
    assert near.per_hour >= anywhere.per_hour  # the data's region may cost more per hour
    _, far = plan.make(ask, default_region=lambda p: None, near=DataPlace("aws", "mars-1"))
    assert far.region == anywhere.region and far.egress_usd_per_gb == 0.02  # inter-region


def test_near_accepts_regions_and_buckets(aws_env):
    from moto import mock_aws

    from mlcloud.errors import UsageError
    from mlcloud.spec.locality import DataPlace, locate

    assert locate("us-west-2") == DataPlace(None, "us-west-2")
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name="eu-central-1")
        s3.create_bucket(
            Bucket="corpus", CreateBucketConfiguration={"LocationConstraint": "eu-central-1"}
        )
        assert locate("s3://corpus/shards/") == DataPlace("aws", "eu-central-1")
        with pytest.raises(UsageError, match="s3://missing: NoSuchBucket"):
            locate("s3://missing")
    with pytest.raises(UsageError, match="not a region"):
        locate("ftp://x")
