"""GPUs on the local provider: nodes on one machine get disjoint slices of its GPUs.

nvidia-smi is played by a script that prints real output captured on an H100
(shared/fixtures/gpu-h100/nvidia-smi-query.csv, copied to tests/data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from mlcloud import templates

QUERY = Path(__file__).parent / "data" / "nvidia-smi-query-h100.csv"


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(
        f'#!/bin/sh\ncase "$*" in\n  *index,name*) cat {QUERY} ;;\n'
        f"  *) cut -d, -f1 {QUERY} ;;\nesac\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def gpus(env_extra: dict) -> dict:
    r = subprocess.run(
        [sys.executable, str(templates.path("node_ctl.py")), "gpus"],
        capture_output=True,
        text=True,
        env={**os.environ, **env_extra},
    )
    return json.loads(r.stdout)


def test_node_ctl_reads_real_nvidia_smi_output(fake_nvidia_smi):
    assert gpus({}) == {"count": 1, "model": "NVIDIA H100 80GB HBM3"}
    assert gpus({"CUDA_VISIBLE_DEVICES": "0"})["count"] == 1
    uuid = "GPU-e35f7077-de7a-8888-61c4-de75b1df6e85"
    assert gpus({"CUDA_VISIBLE_DEVICES": uuid})["count"] == 1
    assert gpus({"CUDA_VISIBLE_DEVICES": ""}) == {"count": 0, "model": None}


def test_one_gpu_two_nodes_share_nothing_one_node_gets_it(fake_nvidia_smi):
    assert run_cli("up", "one", "--nodes", "1").returncode == 0
    assert run_cli("up", "two", "--nodes", "2").returncode == 0
    clusters = {c["name"]: c for c in json.loads(run_cli("status", "--json").stdout)["clusters"]}
    assert [n["gpus"] for n in clusters["one"]["nodes"]] == [1]
    assert clusters["one"]["nodes"][0]["gpu_type"] == "NVIDIA H100 80GB HBM3"
    assert [n["gpus"] for n in clusters["two"]["nodes"]] == [0, 0]  # no rank shares a GPU
    r = run_cli("exec", "two", "--", 'echo "[$CUDA_VISIBLE_DEVICES]"')
    assert sorted(r.stdout.split()) == ["[]", "[]", "[node0]", "[node1]"]
    for name in ("one", "two"):
        assert run_cli("down", name, "--yes").returncode == 0
