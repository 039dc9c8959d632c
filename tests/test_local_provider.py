"""The local provider's limits: at most one node per core of this machine."""

from __future__ import annotations

import json
import os

from conftest import run_cli


def test_more_nodes_than_cores_is_refused_in_one_line():
    cores = len(os.sched_getaffinity(0))
    r = run_cli("up", "big", "--nodes", "10000", "--yes")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"this machine has {cores}" in r.stderr
    assert json.loads(run_cli("status", "--json").stdout)["clusters"] == []
