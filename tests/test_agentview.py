"""The engine's reader of the node agent's files and the config it hands the agent."""

from __future__ import annotations

import json

import pytest

from mlcloud.control import agentview
from mlcloud.provision import bootstrap
from mlcloud.remote.local import LocalTransport
from mlcloud.spec.task import AutoscaleSpec


def test_deadline_from_budget_and_rate():
    assert bootstrap.deadline(10.0, 20.0, 1000.0) == 1000.0 + 1800
    assert bootstrap.deadline(None, 20.0, 1000.0) is None
    assert bootstrap.deadline(10.0, 0.0, 1000.0) is None  # nothing billed: no deadline


def test_config_carries_the_rules_and_the_node():
    auto = AutoscaleSpec(idle_minutes=0.5, on_stall="stop", poll_seconds=2)
    c = bootstrap.config(auto, "aws", "c-1234", 2, "i-0abc", True, 99.0)
    assert c["idle_minutes"] == 0.5 and c["on_stall"] == "stop" and c["poll_seconds"] == 2
    assert c["tag"] == "c-1234.2." and c["node"] == 2 and c["deadline"] == 99.0
    assert c["node_id"] == "i-0abc" and c["spot"] is True
    assert set(c["metadata"]) == {"aws", "gce"}


def test_read_over_a_transport(tmp_path):
    d = tmp_path / "agent"
    d.mkdir()
    sample = {
        "time": 5.0,
        "gpus": [{"index": 0, "util": 99.0, "mem_used": 1710.0, "mem_total": 81559.0, "power": 1}],
        "cpu_percent": 12.5,
        "mem_used_mb": 100,
        "mem_total_mb": 200,
        "job": {"id": 3, "state": "running", "step": 40, "log_bytes": 9, "started": 1.0},
        "verdict": "busy",
    }
    (d / "samples.jsonl").write_text(
        "\n".join(json.dumps({**sample, "time": float(t)}) for t in range(10)) + "\n"
    )
    (d / "events.jsonl").write_text(
        json.dumps({"time": 1.5, "kind": "stall", "node": 1, "message": "m"})
        + "\n"
        + '{"time": 2, "kind": "idl'  # a line being appended as it is read
    )
    (d / "stopped").write_text(json.dumps({"time": 7.0, "kind": "budget_stop", "reason": "r"}))
    view = agentview.read(LocalTransport("node1"), str(tmp_path), 1)
    assert view.stopped == agentview.Stopped(7.0, "budget_stop", "r")
    assert view.events == (agentview.Event(1.5, "stall", 1, "m"),)
    probe = agentview.probe(LocalTransport("node1"), str(tmp_path), 100.0)  # samples: its
    assert [s.time for s in probe.samples] == [float(t) for t in range(10)]
    s = probe.samples[-1]
    assert s.job == agentview.JobSample(3, "running", 40) and s.gpus[0].util == 99.0
    assert s.verdict == "busy" and s.cpu_percent == 12.5


def test_samples_parse_and_runs():
    """One reader of samples.jsonl for `status` and the controller's probe."""
    s = agentview.parse_samples(
        "\n".join(
            [
                '{"time": 1, "verdict": "busy", "job": {"id": 1, "state": "running", "step": 5}}',
                "garbage",
                '{"time": 2, "verdict": "idle", "job": null}',
                '{"time": 2.5, "verdict": "idle", "gpus": [7]}',  # not a sample
                '{"time": 3, "verdict": "idle"}',
                '{"time": 4, "verd',  # a line the agent is still writing
            ]
        )
    )
    assert [x.time for x in s] == [1, 2, 3] and s[0].job == agentview.JobSample(1, "running", 5)
    assert s[0].job.progress is None  # no progress said (or an older agent)
    assert agentview.since(s, "idle") == 2 and agentview.since(s, "busy") is None
    assert agentview.since((), "idle") is None


@pytest.mark.parametrize(
    ("said", "fraction"),
    [(0.25, 0.25), (0, 0.0), (1, 1.0), (None, None), (1.5, None), (-0.1, None), ("0.5", None)],
)
def test_a_samples_progress_is_a_fraction_or_none(said, fraction):
    job = {"id": 1, "state": "running", "step": None, "progress": said}
    (s,) = agentview.parse_samples(json.dumps({"time": 1, "verdict": "busy", "job": job}))
    assert s.job is not None and s.job.progress == fraction


def test_read_a_node_without_an_agent(tmp_path):
    view = agentview.read(LocalTransport("node0"), str(tmp_path), 0)
    assert view == agentview.NodeView(0, None, ())


def test_metadata_endpoints_are_the_clouds_unless_replaced(monkeypatch):
    """Emulated cloud nodes (moto + sshd here) must never have their agent ask the real
    169.254.169.254: the suite replaces the endpoints, and a user's emulator can too."""

    monkeypatch.delenv("MLCLOUD_METADATA_AWS")
    monkeypatch.delenv("MLCLOUD_METADATA_GCE")
    assert bootstrap.metadata_endpoints() == bootstrap.METADATA
    monkeypatch.setenv("MLCLOUD_METADATA_AWS", "http://127.0.0.1:9")
    assert bootstrap.metadata_endpoints()["aws"] == "http://127.0.0.1:9"


def test_read_takes_only_the_tail_of_a_long_event_log(tmp_path, monkeypatch):
    """A pass reads a fixed number of bytes of events.jsonl, whatever its length: the newest
    events, the line the byte count cut through left out."""
    monkeypatch.setattr(agentview, "EVENTS_READ", 1000)
    d = tmp_path / "agent"
    d.mkdir()
    with open(d / "events.jsonl", "w") as f:
        for i in range(2000):
            f.write(json.dumps({"time": float(i), "kind": "stall", "node": 0, "message": "m"}))
            f.write("\n")
    view = agentview.read(LocalTransport("node0"), str(tmp_path), 0)
    times = [e.time for e in view.events]
    assert times[-1] == 1999.0 and 10 < len(times) < 20
    assert times == [float(t) for t in range(int(times[0]), 2000)]


def _progress(points, job_id=4):
    """Samples as the agent writes them, at fake times: (time, fraction or None)."""
    return tuple(
        agentview.Sample(t, (), 0.0, 0, 0, agentview.JobSample(job_id, "running", None, f), "busy")
        for t, f in points
    )


T0 = 1_000_000.0  # a fake clock: the samples' own times are the only clock the estimate reads


def test_remaining_time_from_the_advance_over_the_window():
    # 10% in 600 s: 1% a minute, 70% left at the newest sample: 70 min
    rows = _progress([(T0 + 5 * k, 0.2 + 0.1 * k / 120) for k in range(121)])
    assert agentview.remaining(rows, 4) == pytest.approx(4200.0)
    # a job that says nothing, or another job's samples, give no estimate
    assert agentview.remaining(_progress([(T0, None), (T0 + 600, None)]), 4) is None
    assert agentview.remaining(rows, 5) is None
    assert agentview.remaining((), 4) is None


def test_remaining_is_none_without_an_advance():
    assert agentview.remaining(_progress([(T0, 0.3), (T0 + 600, 0.3)]), 4) is None  # flat
    assert agentview.remaining(_progress([(T0 + 600, 0.3)]), 4) is None  # one sample
    # an advance measured over less than MIN_SPAN_S says little
    assert agentview.remaining(_progress([(T0, 0.3), (T0 + 10, 0.4)]), 4) is None
    assert agentview.remaining(_progress([(T0, 0.3), (T0 + 60, 0.4)]), 4) == pytest.approx(360)


def test_remaining_counts_from_the_last_fall_and_reads_done_as_zero():
    # the job restarted from a checkpoint at T0+300 (the fraction fell): only what came after
    rows = _progress([(T0, 0.5), (T0 + 290, 0.6), (T0 + 300, 0.4), (T0 + 400, 0.45)])
    assert agentview.remaining(rows, 4) == pytest.approx(0.55 * 100 / 0.05)
    rows = _progress([(T0, 0.5), (T0 + 290, 0.6), (T0 + 300, 0.4), (T0 + 310, 0.41)])
    assert agentview.remaining(rows, 4) is None  # 10 s since the restart
    assert agentview.remaining(_progress([(T0, 0.9), (T0 + 5, 1.0)]), 4) == 0.0


def test_the_jobs_remaining_time_is_its_slowest_nodes():
    fast = _progress([(T0, 0.5), (T0 + 100, 0.6)])  # 400 s left
    slow = _progress([(T0 + 7, 0.5), (T0 + 107, 0.55)])  # 900 s left (another clock)
    silent = _progress([(T0, None), (T0 + 100, None)])  # a node where the job says nothing
    assert agentview.job_remaining([fast, slow, silent], 4) == pytest.approx(900.0)
    assert agentview.job_remaining([silent, fast], 4) == pytest.approx(400.0)
    assert agentview.job_remaining([silent, ()], 4) is None
    assert agentview.job_remaining([], 4) is None


def _sample(t: float, verdict: str = "busy") -> agentview.Sample:
    return agentview.Sample(t, (), 0.0, 0, 0, None, verdict)


def test_a_held_window_reads_only_what_came_since_the_last_pass():
    w = agentview.Window(every=5.0)
    assert w.lines("n0", 100.0) == agentview.WINDOW  # nothing held: the whole window
    w.merge("n0", 100.0, agentview.WINDOW, tuple(_sample(t) for t in range(0, 600, 5)))
    assert w.lines("n0", 105.0) == 3  # one period: its sample, and two for slack
    w.merge("n0", 105.0, 3, (_sample(590), _sample(595), _sample(600, "idle")))
    rows = w.held["n0"]
    assert len(rows) == agentview.WINDOW and rows[-1].time == 600 and rows[0].time == 5
    assert [s.time for s in rows[-3:]] == [590, 595, 600]  # nothing twice
    assert agentview.since(rows, "idle") == 600
    assert w.lines("n0", 105.0 + 3600) == agentview.WINDOW  # a long pause: never more


def test_a_read_that_may_have_left_a_gap_is_followed_by_a_whole_window():
    w = agentview.Window(every=5.0)
    w.merge("n0", 0.0, agentview.WINDOW, (_sample(0, "idle"), _sample(5, "idle")))
    # three lines asked, three read, none of them known: a busy sample may lie between
    w.merge("n0", 5.0, 3, (_sample(100, "idle"), _sample(105, "idle"), _sample(110, "idle")))
    assert agentview.since(w.held["n0"], "idle") == 100  # never 0 across the gap
    assert w.lines("n0", 10.0) == agentview.WINDOW
    w.forget(set())
    assert w.held == {} and w.lines("n0", 10.0) == agentview.WINDOW
