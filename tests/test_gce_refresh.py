"""`catalog refresh --provider gce`: on-demand prices from the Cloud Billing Catalog API (a
stand-in on loopback serving Compute Engine SKUs), and the shipped copy when it is offline."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from conftest import run_cli
from mlcloud.providers.gce.provider import GceProvider

from mlcloud.spec import catalog
from mlcloud.spec.catalog.refresh import refresh_gce


def sku(description: str, usd: float, region: str = "us-central1", usage="OnDemand") -> dict:
    units, nanos = int(usd), round((usd - int(usd)) * 1e9)
    return {
        "description": description,
        "category": {"resourceFamily": "Compute", "usageType": usage},
        "serviceRegions": [region],
        "pricingInfo": [
            {
                "pricingExpression": {
                    "tieredRates": [{"unitPrice": {"units": str(units), "nanos": nanos}}]
                }
            }
        ],
    }


SKUS = [
    sku("N1 Predefined Instance Core running in Americas", 0.031611),
    sku("N1 Predefined Instance Ram running in Americas", 0.004237),
    sku("Nvidia Tesla T4 GPU running in Americas", 0.35),
    sku(
        "Nvidia Tesla T4 GPU attached to Spot Preemptible VMs running in Americas",
        0.14,
        usage="Preemptible",
    ),
    sku("Nvidia Tesla A100 80GB GPU running in Americas", 9.9),  # not the A100 (40GB) SKU
]


@pytest.fixture
def billing(monkeypatch):
    """The SKU list in two pages, as the Billing Catalog API pages it."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            second = "pageToken=p2" in self.path
            body = {"skus": SKUS[3:] if second else SKUS[:3]}
            if not second:
                body["nextPageToken"] = "p2"
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLCLOUD_GCE_BILLING_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield seen
    server.shutdown()


def test_refresh_prices_machines_from_their_parts(gce_env, mlcloud_home, billing):
    refreshed, kept = refresh_gce(GceProvider())
    assert refreshed >= 1 and kept > 100
    assert len(billing) == 2 and "/v1/services/6F81-5844-456A/skus" in billing[0]
    offers = catalog.load()
    t4 = catalog.lookup(offers, "gce", "n1-standard-8+T4:1", "us-central1")
    assert t4.on_demand == pytest.approx(8 * 0.031611 + 30 * 0.004237 + 0.35)
    assert t4.note.startswith("refreshed") and t4.spot is not None  # spot kept as shipped
    a2 = catalog.lookup(offers, "gce", "a2-highgpu-1g", "us-central1")
    assert "not refreshed" in a2.note  # no A2 SKUs served
    assert catalog.refreshed_path("gce").read_text().startswith("# GCE rows refreshed on")


def test_refresh_offline_says_the_shipped_copy_serves(gce_env, monkeypatch):
    monkeypatch.setenv("MLCLOUD_GCE_BILLING_ENDPOINT", "http://127.0.0.1:9")  # nothing there
    r = run_cli("catalog", "refresh", "--provider", "gce")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: could not refresh gce prices") and "2026-11-27" in r.stderr
    assert run_cli("offers", "T4:1", "--provider", "gce").returncode == 0


def test_refresh_against_the_fake_prices_every_shipped_row(gce_env, mlcloud_home, monkeypatch):
    """The fake's Billing Catalog is made from the shipped catalog: every row gets a price,
    and a GPU's smallest shape comes back as shipped."""
    monkeypatch.setenv("MLCLOUD_GCE_BILLING_ENDPOINT", gce_env.url)
    shipped = catalog.lookup(catalog.load(), "gce", "n1-standard-8+T4:1", "us-central1")
    refreshed, kept = refresh_gce(GceProvider())
    assert kept == 0 and refreshed == len([o for o in catalog.load() if o.provider == "gce"])
    fresh = catalog.lookup(catalog.load(), "gce", "n1-standard-8+T4:1", "us-central1")
    assert fresh.on_demand == pytest.approx(shipped.on_demand, rel=1e-3)
