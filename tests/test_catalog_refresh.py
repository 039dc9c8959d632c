"""`catalog refresh` for AWS: spot history from moto, on-demand prices from an injected Price
List answer (moto does not serve the Pricing API), and the offline case."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from mlcloud.providers.aws.provider import AwsProvider
from moto import mock_aws

from mlcloud.spec import catalog
from mlcloud.spec.catalog.refresh import refresh_aws


def price_list(itype: str, region: str, usd: str) -> str:
    return json.dumps(
        {
            "product": {"attributes": {"instanceType": itype, "regionCode": region}},
            "terms": {
                "OnDemand": {
                    "SKU.TERM": {
                        "priceDimensions": {
                            "SKU.TERM.DIM": {"unit": "Hrs", "pricePerUnit": {"USD": usd}}
                        }
                    }
                }
            },
        }
    )


def answer_get_products(params, **_):
    from botocore.awsrequest import AWSResponse

    filters = {f["Field"]: f["Value"] for f in json.loads(params["body"])["Filters"]}
    known = {
        "p4d.24xlarge": [("us-east-1", "21.9576"), ("us-west-2", "21.9576")],
        "g5.xlarge": [("us-east-1", "1.006")],
    }
    items = [
        price_list(filters["instanceType"], r, usd)
        for r, usd in known.get(filters["instanceType"], [])
    ]
    return (
        AWSResponse("https://api.pricing.us-east-1.amazonaws.com/", 200, {}, None),
        {"PriceList": items, "FormatVersion": "aws_v1"},
    )


def test_refresh_writes_fresh_rows_that_win(aws_env, mlcloud_home):
    with mock_aws():
        p = AwsProvider()
        p.api.session.events.register("before-call.pricing.GetProducts", answer_get_products)
        refreshed, kept = refresh_aws(p)
        offers = catalog.load()
    assert refreshed == 3 and kept > 100
    p4d = catalog.lookup(offers, "aws", "p4d.24xlarge", "us-east-1")
    assert p4d.on_demand == pytest.approx(21.9576) and p4d.note.startswith("refreshed")
    assert p4d.spot == pytest.approx(0.00001)  # moto's fixed spot history
    g5 = catalog.lookup(offers, "aws", "g5.xlarge", "eu-west-1")
    assert "not refreshed" in g5.note
    assert catalog.lookup(offers, "gce", "a2-highgpu-8g", "europe-west4") is not None
    text = catalog.refreshed_path("aws").read_text()
    assert text.startswith("# AWS rows refreshed on") and "Price List API" in text


def test_refresh_offline_says_the_shipped_copy_serves(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    r = run_cli("catalog", "refresh", "--provider", "aws", timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not refresh aws prices") and "2026-11-27" in line
    assert run_cli("offers", "A100:8", "--provider", "aws").returncode == 0
