"""End-to-end tests of templates/ddp/train.py under real torchrun (2 CPU processes, gloo)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# one worker runs them all, so the module's first run (below) is made once
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("template_ddp")]

SCRIPT = Path(__file__).parent.parent / "templates" / "ddp" / "train.py"
TIMEOUT = 120


def _env(ckpt_dir):
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MLCLOUD_CHECKPOINT_DIR=str(ckpt_dir))
    env["MLCLOUD_OUTPUT_DIR"] = str(Path(ckpt_dir) / "outputs")
    env["MLCLOUD_PROGRESS_FILE"] = str(Path(ckpt_dir) / "progress")
    # the harsh case, whatever this machine's environment: unbuffered, print() would write a
    # line's text and newline apart and the two ranks' lines would splice
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cmd(*args):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(SCRIPT),
        *map(str, args),
    ]


def _descendants(pid):
    """All descendant pids, read from /proc (torchrun starts each worker in its own session,
    so killing torchrun or its process group does not reach the workers)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc):
    for pid in [*_descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def _start(ckpt_dir, *args):
    return subprocess.Popen(
        _cmd(*args), env=_env(ckpt_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(proc, timeout=TIMEOUT):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        pytest.fail(f"torchrun did not finish within {timeout} s")
    return proc.returncode, out


def _run(ckpt_dir, *args):
    rc, out = _wait(_start(ckpt_dir, *args))
    assert rc == 0, out
    return out


def _losses(out):
    return [float(m) for m in re.findall(r"^step \d+ loss (\S+)$", out, re.M)]


def _ckpt_steps(ckpt_dir):
    return sorted(int(p.name[5:13]) for p in Path(ckpt_dir).glob("ckpt-*.pt"))


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, str]:
    """One run of 40 steps, a checkpoint every 10 and the newest 2 kept: its directory and
    output, which the tests read and go on from (each in a copy). Torch's start in torchrun
    and in each rank is most of a run's cost."""
    ckpt_dir = tmp_path_factory.mktemp("first")
    out = _run(ckpt_dir, "--steps", 40, "--ckpt-every", 10, "--log-every", 10, "--keep", 2)
    return ckpt_dir, out


def _copy(first, to: Path) -> Path:
    shutil.copytree(first[0], to)
    return to


def test_trains_checkpoints_and_reports(first):
    ckpt_dir, out = first
    ranks = re.findall(r"^rank (\d+)/2 local_rank (\d+) node 0 backend gloo$", out, re.M)
    assert sorted(ranks) == [("0", "0"), ("1", "1")], out
    assert "starting from step 0" in out
    losses = _losses(out)
    assert len(losses) == 4, out
    final = float(re.search(r"^done steps=40 world_size=2 final_loss=(\S+)$", out, re.M)[1])
    assert final < losses[0] * 0.7, out
    assert _ckpt_steps(ckpt_dir) == [30, 40]
    assert not list(ckpt_dir.glob(".*tmp")), "temp files left behind"
    progress = json.loads((ckpt_dir / "progress.json").read_text())
    assert progress["step"] == 40 and progress["total"] == 40 and progress["world_size"] == 2
    # mlcloud's progress convention, the one the node agent reads: steps done out of total
    assert json.loads((ckpt_dir / "progress").read_text()) == {"done": 40, "total": 40}
    assert progress["loss"] == pytest.approx(final, abs=1e-4)
    assert abs(progress["time"] - time.time()) < TIMEOUT and isinstance(progress["pid"], int)
    import torch  # here, not at collection: every xdist worker collects this module

    state = torch.load(ckpt_dir / "ckpt-00000040.pt", weights_only=True)
    assert state["step"] == 40 and {"model", "optim"} <= state.keys()
    metrics = json.loads((ckpt_dir / "outputs" / "metrics.json").read_text())
    assert metrics == {"steps": 40, "final_loss": pytest.approx(final, abs=1e-4), "world_size": 2}
    model = torch.load(ckpt_dir / "outputs" / "model.pt", weights_only=True)
    assert model.keys() == state["model"].keys()


def test_resume_continues_the_same_run(first, tmp_path):
    assert "done steps=40" in first[1]
    out = _run(_copy(first, tmp_path / "a"), "--steps", 80, "--ckpt-every", 20)
    assert "resumed from step 40" in out
    assert re.findall(r"^step (\d+) loss", out, re.M)[0] == "50", out
    assert "done steps=80 world_size=2" in out
    # Same data stream and optimizer state: identical to a run that was never interrupted.
    straight = _run(tmp_path / "b", "--steps", 80, "--ckpt-every", 20)
    final = re.compile(r"final_loss=(\S+)")
    assert final.search(out)[1] == final.search(straight)[1]


def test_corrupt_newest_checkpoint_is_skipped(first, tmp_path):
    ckpt_dir = _copy(first, tmp_path / "c")
    newest = ckpt_dir / "ckpt-00000040.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    out = _run(ckpt_dir, "--steps", 50, "--ckpt-every", 10)
    assert "warning: skipping unreadable checkpoint" in out and "ckpt-00000040.pt" in out
    assert "resumed from step 30" in out
    assert "done steps=50" in out
    assert 50 in _ckpt_steps(ckpt_dir)


def test_sigterm_checkpoints_and_stops(tmp_path):
    proc = _start(tmp_path, "--steps", 100000, "--ckpt-every", 100000, "--log-every", 5)
    try:
        deadline = time.monotonic() + 60
        progress = {}
        while progress.get("step", 0) < 20:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no progress to step 20 within 60 s"
            time.sleep(0.2)
            try:
                progress = json.loads((tmp_path / "progress.json").read_text())
            except (OSError, ValueError):
                pass
        proc.send_signal(signal.SIGTERM)
        rc, out = _wait(proc, timeout=60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    m = re.search(r"^stopped by signal at step (\d+)$", out, re.M)
    assert m, out
    step = int(m[1])
    assert step >= 20
    assert rc != 0  # torchrun reports the signal it got, not the workers' 143
    import torch

    state = torch.load(tmp_path / f"ckpt-{step:08d}.pt", weights_only=True)
    assert state["step"] == step
    with pytest.raises(ProcessLookupError):  # rank 0 is gone, not orphaned
        os.kill(progress["pid"], 0)
