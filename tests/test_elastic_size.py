"""Elastic size: `--nodes MIN:MAX` / `nodes: "MIN:MAX"`, the elastic torchrun command line,
and spare hosts on the ssh provider."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlcloud.providers.base import CapacityError, ProvisionRequest, SshOptions

from mlcloud import state
from mlcloud.errors import UsageError
from mlcloud.jobs import launch
from mlcloud.provision.handle import Handle
from mlcloud.spec.task import TaskSpec, load_spec, parse_nodes


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, (None, 3)), ("3", (None, 3)), ("2:4", (2, 4)), (" 1 : 2 ", (1, 2)), ("2:2", (2, 2))],
)
def test_parse_nodes(value, expected):
    assert parse_nodes(value) == expected


@pytest.mark.parametrize("value", [0, "0:2", "3:2", "a:b", "2:", ":2", True, 1.5, "1:2:3"])
def test_parse_nodes_refuses(value):
    with pytest.raises(UsageError, match=r"--nodes: .* or MIN:MAX \(e.g. 2:4\)"):
        parse_nodes(value)


def test_spec_elastic_nodes_round_trip(tmp_path):
    f = tmp_path / "mlcloud.yaml"
    f.write_text('name: ok\nnodes: "1:3"\n')
    spec = load_spec(f)
    assert (spec.min_nodes, spec.nodes, spec.node_count, spec.elastic) == (1, 3, 3, True)
    d = spec.to_dict()
    assert d["nodes"] == "1:3" and "min_nodes" not in d
    assert TaskSpec.from_dict(d) == spec
    fixed = TaskSpec.from_dict({"nodes": 2})
    assert (fixed.min_nodes, fixed.nodes, fixed.elastic) == (None, 2, False)


def test_spec_unquoted_range_is_min_max_not_base_60(tmp_path):
    """YAML 1.1 reads a plain `2:4` as 124 (base 60): a user who leaves out the quotes must get
    MIN:MAX, not 124 nodes; other numeric fields refuse such text in one line."""
    f = tmp_path / "mlcloud.yaml"
    f.write_text("name: ok\nnodes: 2:4\n")
    spec = load_spec(f)
    assert (spec.min_nodes, spec.nodes) == (2, 4)
    f.write_text("name: ok\nnodes: 4:2\n")
    with pytest.raises(UsageError, match=r"mlcloud.yaml:2: nodes: .*MIN:MAX.*'4:2'"):
        load_spec(f)
    f.write_text("autoscale:\n  idle_minutes: 1:30\n")
    with pytest.raises(UsageError, match=r"autoscale.idle_minutes: must be a number.*'1:30'"):
        load_spec(f)


def test_spec_bad_range_names_the_line(tmp_path):
    f = tmp_path / "mlcloud.yaml"
    f.write_text('name: ok\nnodes: "4:2"\n')
    with pytest.raises(UsageError, match=r"mlcloud.yaml:2: nodes: .*MIN:MAX.*'4:2'"):
        load_spec(f)


def _handle(nodes_spec, n=2):
    nodes = tuple(
        state.NodeRecord(
            i,
            f"h{i}",
            f"10.0.0.{i + 1}",
            f"10.0.0.{i + 1}",
            f"/r/u/node-{k}",
            0,
            None,
            "running",
            "/usr/bin/python3",
        )
        for i, k in enumerate([0, 2][:n])
    )
    rec = state.ClusterRecord("c", "u", "ssh", "UP", {"nodes": nodes_spec}, "o", 0, 0, nodes)
    transports = [SimpleNamespace(python="/usr/bin/python3") for _ in nodes]
    return Handle(rec, None, None, transports)


REQ = launch.JobRequest(Path("."), "train.py", ("--steps", "5"), None, {}, None, None)


def test_elastic_job_runs_torchrun_elastic():
    h = _handle("1:2")
    head, other = (launch.node_job(h, REQ, 7, i, 29500, 2, rdzv=1) for i in range(2))
    assert "--nnodes=1:2" in head["argv"]
    assert f"--max-restarts={launch.ELASTIC_RESTARTS}" in head["argv"]
    assert "--rdzv-conf=is_host=true,last_call_timeout=5" in head["argv"]
    assert "--rdzv-conf=is_host=false,last_call_timeout=5" in other["argv"]
    assert "--rdzv-endpoint=10.0.0.1:29500" in other["argv"]
    assert "--rdzv-id=u-7-1" in other["argv"]
    assert head["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    # per node per job: where the job may say how far it is (the node agent reads it)
    assert head["env"]["MLCLOUD_PROGRESS_FILE"] == "/r/u/node-0/jobs/7/progress"
    assert other["env"]["MLCLOUD_PROGRESS_FILE"] == "/r/u/node-2/jobs/7/progress"
    # a spare in position 1 keeps the number of its own directory in its process tag
    # and the rendezvous: a restart's processes are not the first run's
    assert other["tag"] == "u.2.7.r1." and head["tag"] == "u.0.7.r1."


def test_fixed_size_job_keeps_todays_command():
    h = _handle(2)
    argv = launch.node_job(h, REQ, 7, 1, 29500, 2)["argv"]
    assert launch.node_job(h, REQ, 7, 1, 29500, 2)["tag"] == "u.2.7."
    assert "--nnodes=2" in argv and "--max-restarts=0" in argv
    assert "--rdzv-conf=is_host=false" in argv
    env = launch.node_job(h, REQ, 7, 1, 29500, 2)["env"]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env


def _request(count, hosts):
    return ProvisionRequest(hosts=hosts, ssh=SshOptions(), count=count)


def test_ssh_hosts_beyond_nodes_are_spares(tmp_path, monkeypatch):
    from mlcloud.providers.base import ClusterRef
    from mlcloud.providers.ssh import SshProvider

    monkeypatch.setenv("MLCLOUD_HOME", str(tmp_path))
    p = SshProvider()
    hosts = ("a@127.0.0.2", "a@127.0.0.3", "a@127.0.0.4")
    p.check(_request(2, hosts))  # two nodes, one spare
    with pytest.raises(UsageError, match="--nodes 4 but 3 host"):
        p.check(_request(4, hosts))
    ref = ClusterRef("c", "c-1", "o", None)
    p.prepare(ref, _request(2, hosts))
    first = p.create(ref, _request(2, hosts), 2)
    assert [n.ip for n in first] == ["127.0.0.2", "127.0.0.3"]
    spare = p.create(ref, _request(1, hosts), 1)  # replacing a lost node takes the spare
    assert [n.ip for n in spare] == ["127.0.0.4"] and spare[0].root.endswith("/node-2")
    with pytest.raises(CapacityError, match="no spare host left"):  # all or nothing
        p.create(ref, _request(1, hosts), 1)


def _rec(nodes_spec, statuses):
    nodes = tuple(
        state.NodeRecord(i, f"h{i}", "ip", "ip", f"/r/node-{i}", 0, None, s, "python3")
        for i, s in enumerate(statuses)
    )
    return state.ClusterRecord("c", "u", "ssh", "UP", {"nodes": nodes_spec}, "o", 0, 0, nodes)


def test_status_reads_stopped_and_degraded_with_why():
    """What `status` shows of an UP cluster: every node stopped is STOPPED (the first node's
    reason), some stopped or lost (below the size it was made with, the elastic MIN) is
    DEGRADED with the count; a row not UP is shown as it is."""
    from mlcloud.control.nodeevents import health

    why = {0: "idle_teardown: idle for 30.0 min"}
    assert health(_rec(2, ["running", "running"]), {}) == ("UP", None)
    assert health(_rec(2, ["terminated", "terminated"]), why) == ("STOPPED", why[0])
    assert health(_rec(2, ["stopped", "stopped"]), {}) == ("STOPPED", "node0 is stopped")
    assert health(_rec(2, ["running", "terminated"]), {}) == (
        "DEGRADED",
        "1 of 2 node(s) lost or stopped",
    )
    assert health(_rec(3, ["running", "running"]), {}) == (  # one dropped, never replaced
        "DEGRADED",
        "1 of 3 node(s) lost or stopped",
    )
    assert health(_rec("2:4", ["running", "running"]), {}) == ("UP", None)  # elastic at MIN
    assert health(_rec("2:4", ["running"]), {})[0] == "DEGRADED"
    assert health(_rec(None, ["running"]), {}) == ("UP", None)  # ssh: one per host
    stopping = replace(_rec(2, ["running", "running"]), status="STOPPING")
    assert health(stopping, {}) == ("STOPPING", None)
