"""The GPU catalog shipped in the package: schema, sanity, provenance, and that it is exactly
what the builder makes of the shared price snapshot."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from mlcloud.spec.catalog import snapshot

SHIPPED = Path(snapshot.__file__).parent / "data" / "gpu_offers.csv"
# The project's shared price snapshot; tests/data/prices is a verbatim copy of it, so the
# rebuild is checked wherever the tests run.
SHARED_PRICES = Path(__file__).resolve().parents[2] / "shared/data/prices"
PRICES = SHARED_PRICES if SHARED_PRICES.is_dir() else Path(__file__).parent / "data" / "prices"
HEADER = [
    "provider",
    "instance_type",
    "gpu_model",
    "gpu_count",
    "gpu_memory_gib",
    "vcpus",
    "ram_gib",
    "region",
    "zones",
    "on_demand_usd_h",
    "spot_usd_h",
    "note",
]


def _parse(text: str) -> tuple[list[str], list[str], list[dict[str, str]]]:
    lines = text.splitlines()
    comments = [line for line in lines if line.startswith("#")]
    reader = csv.reader(line for line in lines if not line.startswith("#"))
    header = next(reader)
    return comments, header, [dict(zip(header, row, strict=True)) for row in reader]


@pytest.fixture(scope="module")
def shipped():
    return _parse(SHIPPED.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rows(shipped):
    return shipped[2]


def _one(rows, provider, instance_type, region):
    found = [
        r
        for r in rows
        if (r["provider"], r["instance_type"], r["region"]) == (provider, instance_type, region)
    ]
    assert len(found) == 1, (provider, instance_type, region)
    return found[0]


def test_header_and_comments_come_first(shipped):
    comments, header, rows = shipped
    text = SHIPPED.read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert header == HEADER == list(snapshot.COLUMNS)
    assert len(rows) > 500
    assert all(line.startswith("# ") for line in comments)


def test_comments_name_date_sources_and_caveat(shipped):
    text = "\n".join(shipped[0])
    assert "2026-11-27" in text
    assert "skypilot-org/skypilot-catalog" in text
    assert "catalogs/v7/aws/vms.csv" in text
    assert "001367d22a0033fac286a8c71aeac7109e431bcb" in text
    assert "catalogs/v7/gcp/vms.csv" in text
    assert "017e2502fb63c7a28757acd94002b2d6099d3e3d" in text
    assert "not quotes" in text
    assert "June 2025" in text
    # what was left out is said, with the reason
    assert "p5e.48xlarge: no on-demand price" in text
    assert "a4-highgpu-8g" in text


def test_every_row_is_sane(rows):
    for r in rows:
        where = (r["provider"], r["instance_type"], r["region"])
        assert r["provider"] in ("aws", "gcp"), where
        od = float(r["on_demand_usd_h"])
        assert od > 0, where
        if r["spot_usd_h"]:
            assert 0 < float(r["spot_usd_h"]) <= od, where
        assert int(r["gpu_count"]) >= 1, where
        assert float(r["gpu_memory_gib"]) > 0, where
        assert float(r["vcpus"]) > 0 and float(r["ram_gib"]) > 0, where
        assert r["gpu_model"] and r["instance_type"] and r["region"], where
        assert r["zones"] and all(r["zones"].split(";")), where


def test_no_duplicate_offers(rows):
    keys = [(r["provider"], r["instance_type"], r["region"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_sorted_rows(rows):
    keys = [(r["provider"], snapshot._natural(r["instance_type"]), r["region"]) for r in rows]
    assert keys == sorted(keys)


def _families(rows, provider):
    return {r["instance_type"].split(".")[0] for r in rows if r["provider"] == provider}


def test_aws_families(shipped, rows):
    fams = _families(rows, "aws")
    for fam in ("p5", "p4d", "p4de", "p3", "g6e", "g6", "g5", "g4dn"):
        assert fam in fams, fam
    assert "p5en" in fams or "p5en" in "\n".join(shipped[0])
    assert "p5e" not in fams  # no on-demand price in the snapshot
    models = {(r["instance_type"], r["gpu_model"]) for r in rows if r["provider"] == "aws"}
    assert ("p4de.24xlarge", "A100-80GB") in models
    assert ("p4de.24xlarge", "A100") not in models
    assert ("p4d.24xlarge", "A100") in models
    assert ("p5.48xlarge", "H100") in models


def test_gcp_families(rows):
    gcp = [r for r in rows if r["provider"] == "gcp"]
    types = {r["instance_type"] for r in gcp}
    for prefix in ("a3-highgpu-", "a3-megagpu-", "a3-ultragpu-", "a2-highgpu-", "a2-ultragpu-"):
        assert any(t.startswith(prefix) for t in types), prefix
    assert any(t.startswith("g2-standard-") for t in types)
    assert not any(t.endswith("-nolssd") for t in types)
    n1 = {r["gpu_model"] for r in gcp if r["instance_type"].startswith("n1-")}
    assert {"T4", "V100", "P100", "P4"} <= n1
    for r in gcp:
        if r["instance_type"].startswith("n1-"):
            assert r["note"] == "n1 VM priced at us-central1 rates"
            machine, _, gpus = r["instance_type"].partition("+")
            assert gpus == f"{r['gpu_model']}:{r['gpu_count']}"
            assert machine in ("n1-standard-8", "n1-standard-16")


def test_gcp_gpu_mapping(rows):
    expect = {
        "a2-highgpu-8g": ("A100", 8, 40),
        "a2-megagpu-16g": ("A100", 16, 40),
        "a2-ultragpu-4g": ("A100-80GB", 4, 80),
        "a3-highgpu-2g": ("H100", 2, 80),
        "a3-megagpu-8g": ("H100-MEGA", 8, 80),
        "a3-ultragpu-8g": ("H200", 8, 141),
        "g2-standard-24": ("L4", 2, 24),
        "g2-standard-32": ("L4", 1, 24),
        "g2-standard-96": ("L4", 8, 24),
    }
    for r in rows:
        if r["provider"] == "gcp" and r["instance_type"] in expect:
            got = (r["gpu_model"], int(r["gpu_count"]), float(r["gpu_memory_gib"]))
            assert got == expect[r["instance_type"]], r


def test_spot_below_on_demand_on_median(rows):
    ratios = [float(r["spot_usd_h"]) / float(r["on_demand_usd_h"]) for r in rows if r["spot_usd_h"]]
    assert len(ratios) > len(rows) / 2
    assert statistics.median(ratios) < 1
    assert statistics.median(ratios) < 0.8


def test_gcp_price_is_machine_plus_gpus(rows):
    r = _one(rows, "gcp", "a2-highgpu-1g", "us-central1")
    assert float(r["on_demand_usd_h"]) == pytest.approx(0.73948 + 2.93391, abs=1e-6)
    assert r["zones"] == "us-central1-a;us-central1-b;us-central1-c;us-central1-f"


def test_aws_june_2025_cut(rows):
    p5 = _one(rows, "aws", "p5.48xlarge", "us-east-1")
    assert float(p5["on_demand_usd_h"]) == pytest.approx(55.04, abs=1e-6)
    assert "june-2025 cut applied" in p5["note"]
    assert float(_one(rows, "aws", "p4d.24xlarge", "us-east-1")["on_demand_usd_h"]) == (
        pytest.approx(21.96, abs=1e-6)
    )
    assert float(_one(rows, "aws", "p4de.24xlarge", "us-east-1")["on_demand_usd_h"]) == (
        pytest.approx(27.447, abs=1e-6)
    )
    # other regions scaled by the same ratio: ap-northeast-1 was 123.19496
    tokyo = _one(rows, "aws", "p5.48xlarge", "ap-northeast-1")
    assert float(tokyo["on_demand_usd_h"]) == pytest.approx(123.19496 * 55.04 / 98.32, abs=1e-5)
    p5en = [r for r in rows if r["instance_type"] == "p5en.48xlarge"]
    assert p5en and all("ratio of p5 applied" in r["note"] for r in p5en)
    # untouched types carry no cut note
    g5 = _one(rows, "aws", "g5.xlarge", "us-east-1")
    assert "june-2025" not in g5["note"]


def test_regional_spot_is_median_of_zones(rows):
    # p5.48xlarge us-east-1 zone samples: 30.3260 27.6948 20.9934 29.3511 25.8774 25.3026
    r = _one(rows, "aws", "p5.48xlarge", "us-east-1")
    assert float(r["spot_usd_h"]) == pytest.approx((27.6948 + 25.8774) / 2, abs=1e-6)
    assert r["zones"] == ";".join(f"use1-az{i}" for i in range(1, 7))


def test_rebuild_reproduces_shipped_file():
    assert snapshot.build(PRICES) == SHIPPED.read_text(encoding="utf-8")
    assert snapshot.build(PRICES).encode() == SHIPPED.read_bytes()


# --- the builder on small synthetic snapshots ----------------------------------------------------

AWS_HEAD = (
    "InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,"
    "Region,AvailabilityZone"
)
GCP_HEAD = (
    "InstanceType,vCPUs,MemoryGiB,AcceleratorName,AcceleratorCount,GpuInfo,Region,"
    "AvailabilityZone,Price,SpotPrice"
)


def _aws_row(itype, gpu, n, mib, price, spot, region, zone):
    info = (
        f"\"{{'Gpus': [{{'Name': '{gpu}', 'Manufacturer': 'NVIDIA', 'Count': {n}, "
        f"'MemoryInfo': {{'SizeInMiB': {mib}}}}}], 'TotalGpuMemoryInMiB': {mib * n}}}\""
    )
    return f"{itype},{gpu},{n}.0,96.0,1152.0,{info},{price},{spot},{region},{zone}"


def _gpu_row(gpu, n, mib, region, zone, price, spot):
    return f",,,{gpu},{n},\"{{'Gpus': [{{'MemoryInfo': {{'SizeInMiB': {mib}}}}}]}}\",{region},{zone},{price},{spot}"  # noqa: E501


def _snapshot(tmp_path, aws_extra=(), gcp_extra=()):
    aws = [
        AWS_HEAD,
        _aws_row("p5.48xlarge", "H100", 8, 81920, 98.32, 30.0, "us-east-1", "use1-az1"),
        _aws_row("p5.48xlarge", "H100", 8, 81920, 120.0, 119.0, "eu-west-2", "euw2-az1"),
        _aws_row("p4d.24xlarge", "A100", 8, 40960, 32.7726, "", "us-east-1", "use1-az1"),
        _aws_row("p4de.24xlarge", "A100", 8, 81920, 40.96575, 7.0, "us-east-1", "use1-az1"),
        _aws_row("p4de.24xlarge", "A100-80GB", 8, 81920, 40.96575, "", "us-east-1", "use1-az1"),
        _aws_row("p5e.48xlarge", "H200", 8, 144384, "", 15.0, "us-east-2", "use2-az1"),
        *aws_extra,
    ]
    gcp = [
        GCP_HEAD,
        "a2-highgpu-1g,12.0,85.0,,,,us-central1,us-central1-a,0.73948,0.2",
        "a2-highgpu-1g,12.0,85.0,,,,us-central1,us-central1-b,0.73948,0.4",
        "a2-highgpu-1g,12.0,85.0,,,,us-central1,us-central1-c,0.73948,0.3",
        "a2-highgpu-1g,12.0,85.0,,,,europe-west9,europe-west9-a,0.8,0.3",
        "a2-highgpu-1g-nolssd,12.0,85.0,,,,us-central1,us-central1-a,0.7,0.2",
        _gpu_row("A100", 1, 40960, "us-central1", "us-central1-a", 2.93391, 1.0),
        _gpu_row("A100", 1, 40960, "us-central1", "us-central1-b", 2.93391, 1.0),
        _gpu_row("A100", 1, 40960, "us-central1", "us-central1-c", 2.93391, 1.0),
        _gpu_row("T4", 1, 16384, "us-central1", "us-central1-a", 0.35, 0.14),
        _gpu_row("T4", 4, 16384, "us-central1", "us-central1-a", 1.40, ""),
        _gpu_row("B200", 8, 184320, "us-central1", "us-central1-b", 90.216, ""),
        *gcp_extra,
    ]
    (tmp_path / snapshot.AWS_FILE).write_text("\n".join(aws) + "\n")
    (tmp_path / snapshot.GCP_FILE).write_text("\n".join(gcp) + "\n")
    return tmp_path


def test_builder_on_synthetic_snapshot(tmp_path):
    text = snapshot.build(_snapshot(tmp_path))
    comments, header, rows = _parse(text)
    assert header == HEADER
    assert text == snapshot.build(tmp_path)  # deterministic
    keys = [(r["provider"], r["instance_type"], r["region"]) for r in rows]
    assert keys == [
        ("aws", "p4d.24xlarge", "us-east-1"),
        ("aws", "p4de.24xlarge", "us-east-1"),
        ("aws", "p5.48xlarge", "eu-west-2"),
        ("aws", "p5.48xlarge", "us-east-1"),
        ("gcp", "a2-highgpu-1g", "us-central1"),
        ("gcp", "n1-standard-8+T4:1", "us-central1"),
        ("gcp", "n1-standard-16+T4:4", "us-central1"),
    ]
    a2 = _one(rows, "gcp", "a2-highgpu-1g", "us-central1")
    assert a2["on_demand_usd_h"] == "3.673390"
    assert a2["spot_usd_h"] == "1.300000"  # median of 1.2, 1.4, 1.3
    eu = _one(rows, "aws", "p5.48xlarge", "eu-west-2")
    assert float(eu["on_demand_usd_h"]) == pytest.approx(120 * 55.04 / 98.32, abs=1e-6)
    assert eu["spot_usd_h"] == eu["on_demand_usd_h"]  # 119 > 67.18 after the cut: capped
    assert "spot capped at on-demand" in eu["note"]
    p4de = _one(rows, "aws", "p4de.24xlarge", "us-east-1")
    assert (p4de["gpu_model"], p4de["gpu_memory_gib"], p4de["spot_usd_h"]) == (
        "A100-80GB",
        "80",
        "7.000000",
    )
    n1 = _one(rows, "gcp", "n1-standard-8+T4:1", "us-central1")
    assert float(n1["on_demand_usd_h"]) == pytest.approx(8 * 0.031611 + 30 * 0.004237 + 0.35)
    assert float(n1["spot_usd_h"]) == pytest.approx(8 * 0.00664 + 30 * 0.00089 + 0.14)
    assert _one(rows, "gcp", "n1-standard-16+T4:4", "us-central1")["spot_usd_h"] == ""
    said = "\n".join(comments)
    assert "p5e.48xlarge: no on-demand price" in said
    assert "europe-west9-a skipped" in said
    assert "a4-highgpu-8g" in said


def test_builder_refuses_a_free_machine(tmp_path):
    bad = _aws_row("g5.xlarge", "A10G", 1, 22888, 0.0, "", "us-east-1", "use1-az1")
    with pytest.raises(ValueError, match="on-demand price must be > 0"):
        snapshot.build(_snapshot(tmp_path, aws_extra=[bad]))


def test_builder_refuses_an_unmapped_gcp_machine(tmp_path):
    odd = "a9-hypergpu-8g,12.0,85.0,,,,us-central1,us-central1-a,1.0,0.5"
    with pytest.raises(ValueError, match="a9-hypergpu-8g"):
        snapshot.build(_snapshot(tmp_path, gcp_extra=[odd]))


def test_main_writes_the_file(tmp_path, capsys):
    out = tmp_path / "out" / "offers.csv"
    assert snapshot.main([str(_snapshot(tmp_path)), str(out)]) == 0
    assert out.read_text(encoding="utf-8") == snapshot.build(tmp_path)
    assert "7 offers" in capsys.readouterr().out
    assert snapshot.main([]) == 2
