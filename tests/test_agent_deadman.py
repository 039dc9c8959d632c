"""The dead-man switch as a pure decision over a fake clock, and preemption notices from a
local HTTP stand-in for EC2's IMDSv2 and GCE's metadata server."""

from __future__ import annotations

import http.server
import json
import os
import secrets
import subprocess
import sys
import threading
import time

import pytest
from agentmod import agent

CFG = {"idle_minutes": 10, "heartbeat_minutes": 15, "deadline": None, "idle_util_percent": 5}


def test_idle_fires_after_idle_minutes_and_not_before():
    assert agent.deadman(1000 + 599, CFG, 1000, None) is None
    kind, reason = agent.deadman(1000 + 600, CFG, 1000, None)
    assert kind == "idle_teardown" and "idle for 10.0 min" in reason
    assert agent.deadman(10**6, CFG, None, None) is None  # not idle: never


def test_fractional_idle_minutes():
    assert agent.deadman(105.9, {**CFG, "idle_minutes": 0.1}, 100, None) is None
    assert agent.deadman(106.0, {**CFG, "idle_minutes": 0.1}, 100, None)[0] == "idle_teardown"


def test_deadline_fires_once_passed_and_not_before():
    cfg = {**CFG, "deadline": 5000.0}
    assert agent.deadman(4999.9, cfg, None, None) is None
    assert agent.deadman(5000.0, cfg, None, None)[0] == "budget_stop"
    assert agent.deadman(4999.0, {**CFG, "deadline": None}, None, None) is None


def test_lost_heartbeat_fires_only_once_a_controller_attached():
    assert agent.deadman(10**6, CFG, None, None) is None  # no heartbeat file: rule not armed
    assert agent.deadman(2000, CFG, None, 899) is None  # 899 s of silence
    kind, reason = agent.deadman(2000, CFG, None, 900)
    assert kind == "heartbeat_lost" and "15.0 min" in reason


def test_budget_comes_first():
    cfg = {**CFG, "deadline": 1.0}
    assert agent.deadman(10**6, cfg, 0, 0)[0] == "budget_stop"


class _Metadata(http.server.BaseHTTPRequestHandler):
    """EC2 IMDSv2 (a PUT for a token, then GETs that carry it) and GCE (Metadata-Flavor)."""

    notice = False
    token = "tok-123"

    def log_message(self, *args):
        pass

    def _answer(self, code, body=""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds"
        ):
            return self._answer(200, self.token)
        self._answer(400)

    def do_GET(self):
        if self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != self.token:
                return self._answer(401)
            if not self.notice:
                return self._answer(404)
            return self._answer(
                200, json.dumps({"action": "terminate", "time": "2026-12-01T17:00:00Z"})
            )
        if self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._answer(403)
            return self._answer(200, "TRUE" if self.notice else "FALSE")
        self._answer(404)


@pytest.fixture
def metadata():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Metadata.notice = False
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("provider", ["aws", "gce"])
def test_preemption_notice_from_the_metadata_server(metadata, provider):
    assert agent.preemption_notice(provider, metadata) is None
    _Metadata.notice = True
    notice = agent.preemption_notice(provider, metadata)
    assert notice and ("instance-action" in notice or "preempted" in notice)


def test_imdsv2_needs_the_token(metadata):
    _Metadata.notice = True
    _Metadata.token = "other"
    try:
        status, _ = agent._http("GET", f"{metadata}/latest/meta-data/spot/instance-action", {})
        assert status == 401
    finally:
        _Metadata.token = "tok-123"


def test_nothing_answering_is_no_notice():
    assert agent.preemption_notice("aws", "http://127.0.0.1:9") is None


def test_notice_sends_sigterm_to_the_job_and_writes_an_event(metadata, tmp_path):
    """A spot notice: the job's processes get SIGTERM at once (so the template checkpoints),
    and the agent says so. Only the notice path runs: nothing here may power a machine off."""
    root = tmp_path / "node-0"
    jobdir = root / "jobs" / "1"
    jobdir.mkdir(parents=True)
    (root / "agent").mkdir()
    marker = tmp_path / "got-term"
    uid = f"uid-{secrets.token_hex(4)}"  # its own: other tests (and runs) kill by tag too
    job = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "def term(*a):\n"
            f"    open({str(marker)!r}, 'w').close()\n"
            "    sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, term)\n"
            "time.sleep(60)\n",
        ],
        env={**os.environ, "MLCLOUD_PROC_TAG": f"{uid}.0.1.9"},
    )
    try:
        time.sleep(0.5)
        waiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        (jobdir / "waiter.pid").write_text(str(waiter.pid))
        a = agent.Agent(str(root))
        cfg = {
            "provider": "aws",
            "spot": True,
            "node": 0,
            "tag": f"{uid}.0.",
            "metadata": {"aws": metadata},
            "idle_minutes": 30,
            "deadline": None,
        }
        assert a.step(cfg, time.time()) is None
        assert job.poll() is None  # no notice, nothing sent
        _Metadata.notice = True
        assert a.step(cfg, time.time()) is None
        assert job.wait(10) == 143 and marker.exists()
        events = [json.loads(x) for x in (root / "agent" / "events.jsonl").read_text().splitlines()]
        assert [e["kind"] for e in events] == ["preemption"]
        assert "SIGTERM to job 1" in events[0]["message"] and events[0]["node"] == 0
        a.step(cfg, time.time())  # told once
        assert len((root / "agent" / "events.jsonl").read_text().splitlines()) == 1
        a.noticed = False
        a.step({**cfg, "spot": False}, time.time())  # on-demand nodes do not ask
        assert len((root / "agent" / "events.jsonl").read_text().splitlines()) == 1
    finally:
        for p in (job, waiter):
            p.kill()
            p.wait()


@pytest.mark.parametrize("on_stall", ["report", "stop"])
def test_stalled_job_is_reported_and_stopped_only_with_on_stall_stop(tmp_path, on_stall):
    """A running job whose log stops growing for stall_minutes: one stall event; with
    on_stall: stop its processes end (node_ctl's kill), with report they run on."""
    uid = f"uid-{secrets.token_hex(4)}"  # its own: other tests (and runs) kill by tag too
    root = tmp_path / "node-0"
    jobdir = root / "jobs" / "1"
    jobdir.mkdir(parents=True)
    (root / "agent").mkdir()
    (jobdir / "output.log").write_text("started\n")
    job = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "MLCLOUD_PROC_TAG": f"{uid}.0.1.0"},
    )
    waiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (jobdir / "waiter.pid").write_text(str(waiter.pid))
        a = agent.Agent(str(root))
        cfg = {"provider": "local", "node": 0, "tag": f"{uid}.0.", "stall_minutes": 0.1}
        cfg["on_stall"] = on_stall
        t0 = time.time()
        verdicts = []
        for dt in (0, 3, 6, 7, 8):
            assert a.step(cfg, t0 + dt) is None
            verdicts.append(a.samples[-1]["verdict"])
        assert verdicts[0] == "starting" and verdicts[-1] == "stalled"
        events = [json.loads(x) for x in (root / "agent" / "events.jsonl").read_text().splitlines()]
        assert [e["kind"] for e in events] == ["stall"]
        assert "no progress" in events[0]["message"]
        if on_stall == "stop":
            assert job.wait(10) == -15
        else:
            time.sleep(0.5)
            assert job.poll() is None
        lines = (root / "agent" / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 5 and json.loads(lines[-1])["job"]["id"] == 1
    finally:
        for p in (job, waiter):
            p.kill()
            p.wait()


def test_the_agent_arms_the_heartbeat_rule_once_the_file_exists(tmp_path):
    root = tmp_path / "node-0"
    (root / "agent").mkdir(parents=True)
    a = agent.Agent(str(root))
    clock = [1000.0]
    a.clock = lambda: clock[0]
    cfg = {"provider": "local", "node": 0, "tag": "uid-3.0.", "heartbeat_minutes": 1}
    now = time.time()
    assert a.step(cfg, now) is None  # no controller ever attached
    (root / "agent" / "heartbeat").write_text(str(now))
    assert a.step(cfg, now) is None  # armed, fresh
    clock[0] += 59
    assert a.step(cfg, now) is None  # fresh enough
    clock[0] += 1
    kind, reason = a.step(cfg, now)
    assert kind == "heartbeat_lost" and "1.0 min" in reason
    assert [json.loads(x)["verdict"] for x in (root / "agent" / "samples.jsonl").open()] == [
        "idle"
    ] * 4


def test_the_samples_on_disk_stay_a_bounded_window(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "WINDOW", 4)
    root = tmp_path / "node-0"
    (root / "agent").mkdir(parents=True)
    a = agent.Agent(str(root))
    cfg = {"provider": "local", "node": 0, "tag": "uid-4.0."}
    t0 = time.time()
    for i in range(25):
        a.step(cfg, t0 + i)
        lines = (root / "agent" / "samples.jsonl").read_text().splitlines()
        assert len(lines) <= 2 * 4
    assert json.loads(lines[-1])["time"] == t0 + 24
    assert [json.loads(x)["time"] for x in lines] == sorted(json.loads(x)["time"] for x in lines)


def test_a_node_directory_being_removed_is_not_written_again(tmp_path):
    """Teardown removes the node's directory while the agent runs: once its files are gone it
    stops instead of creating them again (which would leave the directory half removed)."""
    root = tmp_path / "node-0"
    (root / "agent").mkdir(parents=True)
    a = agent.Agent(str(root))
    cfg = {"provider": "local", "node": 0, "tag": "uid-5.0."}
    a.event(cfg, "agent_start", "hello")
    assert a.step(cfg, time.time()) is None
    for f in (root / "agent").iterdir():
        f.unlink()
    with pytest.raises(agent.NodeRemoved):
        a.step(cfg, time.time())
    assert list((root / "agent").iterdir()) == []


def test_a_new_deadline_moves_the_scheduled_shutdown(monkeypatch):
    """The controller resized the cluster: an EC2 node's `shutdown -h +M` follows the new
    deadline (it replaces the pending one); an unchanged deadline, or a node that is not the
    instance the metadata server describes, schedules nothing."""
    scheduled = []
    monkeypatch.setattr(agent, "power_off", scheduled.append)
    monkeypatch.setattr(agent, "may_power_off", lambda cfg: cfg["node_id"] == "i-1")
    cfg = {"provider": "aws", "node_id": "i-1", "deadline": time.time() + 3600 + 30}
    assert agent.rearm(cfg, cfg["deadline"]) == cfg["deadline"] and scheduled == []
    assert agent.rearm(cfg, time.time() + 600) == cfg["deadline"] and scheduled == [60]
    assert agent.rearm({**cfg, "node_id": "i-2"}, None) and scheduled == [60]
    assert agent.rearm({**cfg, "provider": "ssh"}, None) and scheduled == [60]


def _beat(path, says):
    """A controller's heartbeat as it writes one: a new file renamed over the old."""
    tmp = path.with_name(".heartbeat.tmp")
    tmp.write_text(f"{says:.3f}")
    tmp.replace(path)


@pytest.mark.parametrize("skew_minutes", [-20, 20])
def test_a_controller_whose_clock_is_off_never_stops_the_node(tmp_path, skew_minutes):
    """The heartbeat is timed on the node's own monotonic clock from when it arrived: a
    controller 20 minutes behind or ahead (past heartbeat_minutes both ways) reads as
    on time while it beats, and as lost once it stops, after heartbeat_minutes."""
    root = tmp_path / "node-0"
    (root / "agent").mkdir(parents=True)
    a = agent.Agent(str(root))
    clock = [500.0]
    a.clock = lambda: clock[0]
    cfg = {"provider": "local", "node": 0, "tag": "uid-3.0.", "heartbeat_minutes": 15}
    beat = root / "agent" / "heartbeat"
    for _ in range(5):  # a controller beating every 5 s with its skewed clock
        _beat(beat, time.time() + skew_minutes * 60)
        assert a.step(cfg, time.time()) is None
        clock[0] += 5
    clock[0] += 15 * 60 - 5 - 0.1
    assert a.step(cfg, time.time()) is None  # just under 15 min since the last beat
    clock[0] += 0.1
    kind, reason = a.step(cfg, time.time())
    assert kind == "heartbeat_lost" and "15.0 min" in reason


def test_a_heartbeat_older_than_the_agent_counts_from_when_it_was_written(tmp_path):
    """An agent restarted under a silent controller does not start the count again: the first
    heartbeat it sees is as old as its file (mtime: this node's clock), not new."""
    root = tmp_path / "node-0"
    (root / "agent").mkdir(parents=True)
    beat = root / "agent" / "heartbeat"
    _beat(beat, 0.0)
    written = time.time() - 61
    os.utime(beat, (written, written))
    a = agent.Agent(str(root))
    cfg = {"provider": "local", "node": 0, "tag": "uid-3.0.", "heartbeat_minutes": 1}
    assert a.step(cfg, time.time())[0] == "heartbeat_lost"
    beat.unlink()  # a controller that left took it away: the rule is disarmed
    assert a.step(cfg, time.time()) is None


def test_events_on_the_node_stay_bounded(tmp_path, monkeypatch):
    """events.jsonl never grows past EVENTS_MAX: its newest half is kept, in whole lines."""
    monkeypatch.setattr(agent, "EVENTS_MAX", 4096)
    root = tmp_path / "node-0"
    (root / "agent").mkdir(parents=True)
    a = agent.Agent(str(root))
    cfg = {"node": 0}
    for i in range(400):
        a.event(cfg, "stall", f"event {i}", now=1000.0 + i)
    path = root / "agent" / "events.jsonl"
    assert path.stat().st_size <= 4096
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[-1]["message"] == "event 399"
    assert [e["time"] for e in lines] == sorted(e["time"] for e in lines)
    assert len(lines) > 10
