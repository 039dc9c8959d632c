"""The torchrun stand-in (torchrun_standin.py) that most job tests run stays what node_ctl and
the jobs see of the real torchrun: the same worker environment and the same failure record,
from the same node_ctl command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STANDIN_VAR, TORCHRUN_STANDIN

from mlcloud import templates

pytestmark = pytest.mark.e2e

# Each rank leaves its environment whole (written aside, renamed); rank 1 fails only once
# rank 0's is there, as the launcher then stops rank 0.
DUMP = """\
import json, os, signal, sys, time
rank = os.environ["RANK"]
with open(f"env-{rank}.json.tmp", "w") as f:
    json.dump(dict(os.environ), f)
os.replace(f"env-{rank}.json.tmp", f"env-{rank}.json")
if rank == "1":
    while not os.path.exists("env-0.json"):
        time.sleep(0.05)
    if os.environ.get("SIGNAL"):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
sys.exit(5 if rank == "1" else 0)
"""
# What differs by nature: where torch keeps its error files, and its agent's own store (the
# stand-in has none: rank 0's torch hosts the store, as without torchrun).
EXPECTED_ONLY_REAL = {"TORCHELASTIC_ERROR_FILE"}


def launch(tmp_path: Path, name: str, standin: bool, **extra: str) -> tuple[int, dict, list[dict]]:
    work, job = tmp_path / name, tmp_path / name / "job"
    job.mkdir(parents=True)
    (work / "dump.py").write_text(DUMP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != STANDIN_VAR}
    env.update({"MLCLOUD_JOB_DIR": str(job), "MLCLOUD_NODE_IP": "127.0.0.1", **extra})
    if standin:
        env[STANDIN_VAR] = TORCHRUN_STANDIN
    argv = [
        sys.executable,
        str(templates.path("node_ctl.py")),
        "torchrun",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        f"--rdzv-id={name}-1-0",
        "--rdzv-conf=is_host=true",
        "--local-addr=127.0.0.1",
        "--max-restarts=0",
        "dump.py",
    ]
    r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=180)
    failure = json.loads((job / "failure.json").read_text())
    envs = [json.loads((work / f"env-{rank}.json").read_text()) for rank in (0, 1)]
    return r.returncode, failure, envs


@pytest.mark.real_torchrun
def test_the_stand_in_gives_what_torchrun_gives(tmp_path):
    real = launch(tmp_path, "real", standin=False)
    fake = launch(tmp_path, "fake", standin=True)
    assert real[0] == fake[0] == 5  # rank 1's own code
    want = {"rank": 1, "local_rank": 1, "exit_code": 5, "signal": None}
    assert {k: v for k, v in real[1].items() if k != "time"} == want
    assert {k: v for k, v in fake[1].items() if k != "time"} == want
    for got, want in zip(fake[2], real[2], strict=True):
        assert set(want) - set(got) == EXPECTED_ONLY_REAL
        assert set(got) - set(want) == {STANDIN_VAR}
        differ = {k for k in set(got) & set(want) if got[k] != want[k]}
        assert differ <= {"MLCLOUD_JOB_DIR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} | {
            "TORCHELASTIC_USE_AGENT_STORE"
        }, {k: (got[k], want[k]) for k in differ}


@pytest.mark.real_torchrun
def test_the_stand_in_tells_a_killed_rank_as_torchrun_does(tmp_path):
    real = launch(tmp_path, "real", standin=False, SIGNAL="SIGKILL")
    fake = launch(tmp_path, "fake", standin=True, SIGNAL="SIGKILL")
    assert real[0] == fake[0] == 137
    want = {"rank": 1, "local_rank": 1, "exit_code": 137, "signal": "SIGKILL"}
    assert {k: v for k, v in real[1].items() if k != "time"} == want
    assert {k: v for k, v in fake[1].items() if k != "time"} == want
