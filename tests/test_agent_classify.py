"""The node agent's stall detector and nvidia-smi parsing, against real H100 telemetry
(tests/data/gpu-h100: two captured runs with marked phases; its README says what a detector
must call each phase)."""

from __future__ import annotations

import calendar
import json
import os
import time
from pathlib import Path

import pytest
from agentmod import agent

DATA = Path(__file__).parent / "data" / "gpu-h100"
IDLE_UTIL = 5.0


def _trace(name: str) -> list[dict]:
    """A `nvidia-smi --query-gpu=timestamp,... --format=csv,nounits -lms 500` capture as GPU
    records (timestamps are UTC)."""
    lines = (DATA / name).read_text().splitlines()
    header = [h.strip() for h in lines[0].split(",")]
    col = {h.split(" [")[0]: i for i, h in enumerate(header)}
    rows = []
    for line in lines[1:]:
        f = [c.strip() for c in line.split(",")]
        stamp, frac = f[0].split(".")
        t = calendar.timegm(time.strptime(stamp, "%Y/%m/%d %H:%M:%S")) + float("0." + frac)
        rows.append(
            {
                "time": t,
                "gpus": [
                    {
                        "index": 0,
                        "util": float(f[col["utilization.gpu"]]),
                        "mem_used": float(f[col["memory.used"]]),
                        "mem_total": 81559.0,
                        "power": float(f[col["power.draw"]]),
                    }
                ],
            }
        )
    return rows


def _phases(name: str) -> dict[str, tuple[float, float]]:
    return {
        p["phase"]: (p["start"], p["end"]) for p in json.loads((DATA / name).read_text())["phases"]
    }


def _replay(trace, jobs, window):
    """Feed the samples one by one, as the agent does each poll: (time, verdict) per sample.
    jobs: (id, start, end) of the jobs that ran; the GPU trace carries no progress signal."""
    samples, verdicts = [], []
    for s in trace:
        job = next(
            (
                {"id": i, "state": "running", "step": None, "log_bytes": None, "started": a}
                for i, a, b in jobs
                if a <= s["time"] < b
            ),
            None,
        )
        samples.append({**s, "job": job})
        verdicts.append(
            (s["time"], agent.classify(samples[-720:], s["time"], window, IDLE_UTIL)[0])
        )
    return verdicts


def _during(verdicts, span, skip=1.0):
    """The verdicts inside a phase, past its first second (a sample straddling the edge)."""
    a, b = span
    return [v for t, v in verdicts if a + skip <= t < b]


def test_parse_real_query_output():
    rows = agent.node_ctl.csv_rows((DATA / "nvidia-smi-query.csv").read_text())
    assert agent.parse_gpus(rows) == [
        {"index": 0, "util": 0.0, "mem_used": 0.0, "mem_total": 81559.0, "power": 72.15}
    ]


def test_parse_not_available_fields():
    """nvidia-smi writes [N/A] where a board lacks a sensor (power on many cards)."""
    line = (DATA / "nvidia-smi-query.csv").read_text().replace("72.15", "[N/A]")
    assert agent.parse_gpus(agent.node_ctl.csv_rows(line))[0]["power"] is None


def test_run1_phase_by_phase():
    """idle -> idle; heavy -> busy; memory held at 0% -> stalled once past the window (not
    before); light -> busy; DDP start-up at 0% -> starting, then busy; tail -> idle."""
    p = _phases("phases.json")
    window = 10.0
    job1 = (1, p["heavy"][0], p["light"][1])  # one process: heavy, then stall, then light
    job2 = (2, p["ddp"][0], p["ddp"][1])
    v = _replay(_trace("util-trace-nvidia-smi.csv"), [job1, job2], window)
    assert set(_during(v, p["idle"])) == {"idle"}
    assert set(_during(v, p["heavy"])) == {"busy"}
    stall = [(t, x) for t, x in v if p["stall"][0] <= t < p["stall"][1]]
    assert {x for t, x in stall if t < p["stall"][0] + window} == {"busy"}
    assert stall[-1][1] == "stalled"
    assert set(_during(v, p["light"], skip=window)) == {"busy"}
    ddp = _during(v, p["ddp"])
    assert "stalled" not in ddp and ddp[0] == "starting" and ddp[-1] == "busy"
    assert set(_during(v, p["tail-idle"])) == {"idle"}


@pytest.mark.parametrize("window", [8.0, 15.0])
def test_run2_partial_loads_are_busy(window):
    """A data-loader-bound (~29%) or bursty (0/100) job is busy, never stalled or idle."""
    p = _phases("phases2.json")
    start, end = p["dataloader-bound"][0], p["idle-with-memory"][1] + 1
    v = _replay(_trace("util-trace2-nvidia-smi.csv"), [(1, start, end)], window)
    assert set(_during(v, p["dataloader-bound"], skip=window)) == {"busy"}
    assert set(_during(v, p["bursty"])) == {"busy"}


def test_run2_checkpoint_pause_shorter_than_window_is_not_a_stall():
    p = _phases("phases2.json")
    start, end = p["dataloader-bound"][0], p["idle-with-memory"][1] + 1
    window = 15.0  # the 12.5 s pause fits in it
    v = _replay(_trace("util-trace2-nvidia-smi.csv"), [(1, start, end)], window)
    assert set(_during(v, p["checkpoint-pause"])) == {"busy"}


def test_run2_memory_held_at_zero_past_the_window_is_stalled():
    p = _phases("phases2.json")
    start, end = p["dataloader-bound"][0], p["idle-with-memory"][1] + 1
    window = 8.0
    v = _replay(_trace("util-trace2-nvidia-smi.csv"), [(1, start, end)], window)
    held = [(t, x) for t, x in v if p["idle-with-memory"][0] <= t < p["idle-with-memory"][1]]
    assert held[-1][1] == "stalled"
    assert "stalled" not in set(_during(v, p["bursty"]))


def _sample(t, step, util=50.0):
    return {
        "time": t,
        "gpus": [{"index": 0, "util": util, "mem_used": 3000.0, "mem_total": 81559.0, "power": 1}],
        "job": {"id": 1, "state": "running", "step": step, "log_bytes": 10, "started": 0.0},
    }


def test_progress_that_stops_is_a_stall_even_at_full_utilization():
    """A rank stuck in a collective shows ~100%: only the step counter tells."""
    samples = [_sample(t, step=min(t, 30)) for t in range(0, 100, 5)]
    assert agent.classify(samples, 95, 60.0, IDLE_UTIL)[0] == "stalled"
    assert agent.classify(samples[:15], 70, 60.0, IDLE_UTIL)[0] == "busy"  # stopped 40 s ago


def test_no_job_and_busy_gpus_is_not_idle():
    s = {"time": 1, "gpus": [{"index": 0, "util": 40.0, "mem_used": 1}], "job": None}
    assert agent.classify([s], 1, 60, IDLE_UTIL)[0] == "busy"
    s["gpus"][0]["util"] = 4.0
    assert agent.classify([s], 1, 60, IDLE_UTIL)[0] == "idle"


def test_the_agent_samples_gpus_through_nvidia_smi(tmp_path, monkeypatch):
    """The query the agent runs, answered with the captured H100 output (an nvidia-smi on PATH
    that prints the real file), narrowed by CUDA_VISIBLE_DEVICES as node_ctl narrows it."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat {DATA / "nvidia-smi-query.csv"}\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    a = agent.Agent(str(tmp_path))
    assert [g["mem_total"] for g in a.gpus()] == [81559.0]
    assert "--format=csv,noheader,nounits" in (tmp_path / "args").read_text()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert a.gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-e35f7077-de7a-8888-61c4-de75b1df6e85")
    assert len(a.gpus()) == 1


def test_no_nvidia_smi_means_no_gpus_and_no_more_asking(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    a = agent.Agent(str(tmp_path))
    assert a.gpus() == [] and a.has_smi is False


@pytest.mark.parametrize(
    ("text", "fraction"),
    [
        ('{"done": 30, "total": 120}', 0.25),
        ('{"done": 0, "total": 7}', 0.0),
        ('{"done": 9, "total": 7}', 1.0),  # past the total reads as done
        ('{"done": 0.5, "total": 1, "loss": 2.0}', 0.5),  # other keys are the job's own
        ('{"done": 3, "total": 0}', None),
        ('{"done": -1, "total": 5}', None),
        ('{"done": true, "total": 5}', None),
        ('{"done": NaN, "total": 5}', None),
        ('{"done": "3", "total": 5}', None),
        ("0.5", None),  # one convention: a bare fraction is not it
        ('{"done": 3, "tot', None),  # being written
        (None, None),  # no file
    ],
)
def test_the_agent_reads_the_jobs_progress_file(tmp_path, text, fraction):
    """The fraction done the job wrote to MLCLOUD_PROGRESS_FILE (named in its job.json's
    environment) goes into each sample's job; anything else there is no progress."""
    jobdir = tmp_path / "jobs" / "3"
    jobdir.mkdir(parents=True)
    progress = jobdir / "progress"
    if text is not None:
        progress.write_text(text)
    env = {"MLCLOUD_PROGRESS_FILE": str(progress)}
    (jobdir / "job.json").write_text(json.dumps({"env": env, "checkpoint_dir": str(tmp_path)}))
    (jobdir / "waiter.pid").write_text(str(os.getpid()))  # a live waiter: the job runs
    job = agent.current_job(str(tmp_path))
    assert job["id"] == 3 and job["state"] == "running"
    assert job["progress"] == fraction
