"""`catalog refresh` for AWS: spot history from moto, on-demand prices from an injected Price
List answer (moto does not serve the Pricing API), and the offline case; without --provider,
each cloud with credentials here (in-process, each refresh a fake); `catalog show --json`."""

from __future__ import annotations

import json
import os
import types

import pytest
from conftest import run_cli
from mlcloud.cli.app import run
from mlcloud.providers.aws.provider import AwsProvider
from moto import mock_aws

from mlcloud.errors import MlcloudError
from mlcloud.spec import catalog
from mlcloud.spec.catalog import refresh
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


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    return (code, *capsys.readouterr())


@pytest.fixture
def clouds(monkeypatch, tmp_path):
    """Credentials for no cloud (then `set("aws")`, `set("gce")`); each refresh is a fake."""
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))
    calls: dict[str, object] = {}

    def fake(name: str, answer):
        def refresh_one(provider):
            calls[name] = provider.name
            if isinstance(answer, Exception):
                raise answer
            return answer

        monkeypatch.setitem(refresh.REFRESH, name, refresh_one)

    fake("aws", (3, 7))
    fake("gce", (2, 5))

    def set_(name: str) -> None:
        var = "AWS_ACCESS_KEY_ID" if name == "aws" else "GOOGLE_APPLICATION_CREDENTIALS"
        monkeypatch.setenv(var, "set")

    return types.SimpleNamespace(set=set_, fake=fake, calls=calls)


def test_refresh_without_a_provider_refreshes_each_configured_cloud(clouds, capsys):
    code, out, err = _cli(capsys, "catalog", "refresh")
    assert code == 5 and out == "" and clouds.calls == {}
    assert err.startswith("error: no credentials here for aws or gce") and err.count("\n") == 1
    clouds.set("gce")
    code, out, err = _cli(capsys, "catalog", "refresh")
    assert code == 0 and err == "" and clouds.calls == {"gce": "gce"}
    assert out.splitlines() == [
        "aws: skipped, no credentials here (`--provider aws` tries anyway)",
        f"refreshed 2 gce offer(s), 5 kept as shipped: {catalog.refreshed_path('gce')}",
    ]
    clouds.set("aws")
    clouds.fake("aws", MlcloudError("offline"))
    code, out, err = _cli(capsys, "catalog", "refresh")  # one failing: the other still goes
    assert code == 1 and out.startswith("refreshed 2 gce offer(s)")
    assert err.startswith("error: could not refresh aws prices (offline); still using the ")
    assert err.count("\n") == 1 and "2026-11-27" in err
    clouds.calls.clear()
    assert _cli(capsys, "catalog", "refresh", "-p", "gce")[0] == 0 and clouds.calls == {
        "gce": "gce"
    }
    code, _, err = _cli(capsys, "catalog", "refresh", "-p", "local")
    assert code == 2 and "'local' uses the shipped figures" in err


def test_show_json_names_the_refreshed_copies_in_use(capsys):
    code, out, _ = _cli(capsys, "catalog", "show", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["refreshed"] == {} and "2026-11-27" in shown["shipped"]["built"]
    assert shown["shipped"]["header"] == catalog.header()
    path = catalog.refreshed_path("gce")
    path.parent.mkdir(parents=True)
    path.write_text(catalog.SHIPPED.read_text())
    shown = json.loads(_cli(capsys, "catalog", "show", "--json")[1])
    assert shown["refreshed"] == {"gce": str(path)}
