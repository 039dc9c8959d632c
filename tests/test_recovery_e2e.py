"""Recovery end to end: three sshd nodes in network namespaces of their own, an elastic job
(`--nodes 1:2`) on two of them and the third a spare. `kill -9` of everything on one node mid
run: `train`'s controller finds it lost within 15 s, the spare joins, the job resumes from
the newest checkpoint (losing at most one checkpoint interval) and completes every step."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import nsbridge
import pytest
from conftest import MLCLOUD, SLOW_TRAIN, run_cli

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.real_torchrun,  # elastic: torch's rendezvous admits the spare
    pytest.mark.skipif(not nsbridge.available(), reason="needs root, iproute2 and sshd"),
]

STEPS, CKPT_EVERY = 400, 20
DETECT_WITHIN = 15.0


@pytest.fixture
def bridge(tmp_path, monkeypatch):
    with nsbridge.NsBridge(3, tmp_path / "ns") as b:
        monkeypatch.setenv("MLCLOUD_NETGUARD_ALLOW", b.subnet)
        yield b


class Lines:
    """A process's stdout, read as it comes, each line with the time it arrived."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.th = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.th.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, after: float = 0.0) -> tuple[float, str]:
        """The first line matching pattern that arrived after `after` (monotonic time)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, line in self.lines:
                    if t > after and re.search(pattern, line):
                        return t, line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {pattern!r} in {timeout} s:\n"
                        + "\n".join(x for _, x in self.lines[-60:])
                    )
                self.cond.wait(left)

    def text(self) -> str:
        with self.cond:
            return "\n".join(x for _, x in self.lines)


def _steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"\] step (\d+) loss", text)]


@pytest.mark.parametrize("victim", [1, 0], ids=["non-head", "head"])
def test_a_killed_node_is_replaced_by_the_spare_and_the_job_completes(bridge, tmp_path, victim):
    assert run_cli("init", str(tmp_path / "proj")).returncode == 0
    proj = tmp_path / "proj"
    (proj / "slow.py").write_text(SLOW_TRAIN)
    spec = proj / "mlcloud.yaml"
    spec.write_text(spec.read_text().replace("nproc_per_node: 2", "nproc_per_node: 1"))
    r = run_cli(
        "up", "el", "--hosts", ",".join(bridge.targets), "--identity", str(bridge.client_key),
        "--nodes", "1:2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    c = json.loads(run_cli("status", "--json").stdout)["clusters"][0]
    uid = c["uid"]
    assert [n["ip"] for n in c["nodes"]] == bridge.hosts[:2]
    try:
        fast = tmp_path / "fast"
        proc = subprocess.Popen(
            [MLCLOUD, "train", "el", "slow.py", "-f", str(spec), "-e", f"SLOW_UNTIL={fast}", "--",
             "--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY), "--log-every", "10"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        out = Lines(proc.stdout)
        out.wait_for(r"rank 1/2 ", 90)
        out.wait_for(rf"\] step {2 * CKPT_EVERY} loss", 90)  # two checkpoints on disk
        before = max(_steps(out.text()))
        bridge.kill(victim)
        killed = time.monotonic()
        seen, line = out.wait_for(r"\[mlcloud\] node\d .* lost: ", 60)
        detected = seen - killed
        assert detected <= DETECT_WITHIN, line
        if victim == 0:  # the rendezvous moves: the job restarts with a new head
            back, _ = out.wait_for(r"\[mlcloud\] job 1 restarted on 2 node\(s\), head ", 90)
        else:
            back, _ = out.wait_for(r"\[mlcloud\] node\d \(.*\) joined job 1", 60)
        two, _ = out.wait_for(r"\] rank 1/2 ", 90, after=back)  # two nodes again, a spare's in
        fast.touch()
        proc.wait(timeout=180)
        ended = time.monotonic()
        text = out.text()
        assert proc.returncode == 0, text[-4000:]
        assert f"done steps={STEPS} world_size=2" in text, text[-4000:]
        resumed = [int(m) for m in re.findall(r"resumed from step (\d+)", text)]
        assert resumed and min(resumed) >= before - CKPT_EVERY, (before, resumed)
        assert f"] step {STEPS} loss" in text
        ips = [
            n["ip"] for n in json.loads(run_cli("status", "--json").stdout)["clusters"][0]["nodes"]
        ]
        # the spare took the lost node's place
        assert ips == (
            [bridge.hosts[2], bridge.hosts[1]]
            if victim == 0
            else [bridge.hosts[0], bridge.hosts[2]]
        )
        print(
            f"detected in {detected:.1f} s, back {back - killed:.1f} s, two nodes "
            f"{two - killed:.1f} s, ended {ended - killed:.1f} s after the kill; last step "
            f"before it {before}, resumed {resumed}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        run_cli("down", "el", "--yes", "--purge")
        shutil.rmtree(Path.home() / ".mlcloud" / uid, ignore_errors=True)
