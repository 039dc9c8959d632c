"""A stand-in for `torch.distributed.run` (torchrun) that does not import torch: for the tests
whose subject is mlcloud's job flow (sync, setup, follow, cancel, exit codes, pull, ...), not
torch. Standard library only.

node_ctl.py runs it in torchrun's place when the node's environment names this file in
MLCLOUD_TEST_TORCHRUN (the tests set it: conftest's autouse fixture for local nodes, the sshd
fleets' SetEnv for ssh nodes); tests marked `real_torchrun` run the real one.

What it keeps of torchrun, as node_ctl and the jobs see it:
- the same arguments (--nnodes N, --nproc-per-node, --rdzv-endpoint, --rdzv-conf is_host=...,
  --local-addr, --max-restarts, script and its arguments);
- a rendezvous at the head's endpoint: no worker starts before every node has joined, and the
  head hands out MASTER_ADDR/MASTER_PORT;
- workers as `python -u SCRIPT ARGS`, each in a session of its own, with torchrun's worker
  environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, ...),
  writing straight to the launcher's stdout and stderr;
- the first failing worker stops the node's others and ends the launcher with ChildFailedError
  (get_first_failure() -> (global rank, failure with exitcode, local_rank, timestamp,
  signal_name())); SIGTERM/SIGINT/SIGHUP/SIGQUIT go on to the workers' process groups and end it
  with SignalException(sigval), with torch's 30 s before SIGKILL, and its second shutdown
  when a second signal comes meanwhile.

Not kept: elastic ranges (--nnodes MIN:MAX) and restarts (tests of those run real torchrun),
torch's TCPStore (MASTER_PORT is a port the head found free; the workers' own torch, if they
import it, hosts the store on rank 0: TORCHELASTIC_USE_AGENT_STORE=False).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

JOIN_TIMEOUT_S = 600.0  # torchrun's c10d rendezvous waits as long
CLOSE_TIMEOUT_S = 30.0  # torchrun's grace between the death signal and SIGKILL
MONITOR_INTERVAL_S = 0.1


class SignalException(Exception):
    def __init__(self, msg: str, sigval: signal.Signals):
        super().__init__(msg)
        self.sigval = sigval


class ProcessFailure:
    def __init__(self, local_rank: int, pid: int, exitcode: int):
        self.local_rank = local_rank
        self.pid = pid
        self.exitcode = exitcode
        self.timestamp = int(time.time())

    def signal_name(self) -> str:
        if self.exitcode < 0:
            try:
                return signal.Signals(-self.exitcode).name
            except ValueError:
                return "<N/A>"
        return "<N/A>"


class ChildFailedError(Exception):
    def __init__(self, name: str, failures: dict[int, ProcessFailure]):
        super().__init__(f"{name} FAILED: ranks {sorted(failures)}")
        self.name = name
        self.failures = failures

    def get_first_failure(self) -> tuple[int, ProcessFailure]:
        rank = min(self.failures, key=lambda r: self.failures[r].timestamp)
        return rank, self.failures[rank]


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun-standin", allow_abbrev=False)
    p.add_argument("--nnodes", default="1")
    p.add_argument("--nproc-per-node", "--nproc_per_node", default="1")
    p.add_argument("--rdzv-backend", "--rdzv_backend", default="static")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", default="")
    p.add_argument("--rdzv-id", "--rdzv_id", default="none")
    p.add_argument("--rdzv-conf", "--rdzv_conf", default="")
    p.add_argument("--local-addr", "--local_addr", default=None)
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0)
    p.add_argument("--node-rank", "--node_rank", type=int, default=None)
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rendezvous(args: argparse.Namespace, nnodes: int, node_rank: int) -> tuple[str, int]:
    """Wait until every node has joined; (MASTER_ADDR, MASTER_PORT) from the head."""
    host, port = _split_endpoint(args.rdzv_endpoint)
    conf = dict(kv.split("=", 1) for kv in args.rdzv_conf.split(",") if "=" in kv)
    is_host = conf.get("is_host", "true" if node_rank == 0 else "false") == "true"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    if is_host:
        master_port = _free_port(host)
        if nnodes == 1:
            return host, master_port
        with socket.socket(family) as server:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((host, port))  # the node's address only, as node_ctl binds torch's
            server.listen(64)
            joined: dict[int, socket.socket] = {}
            while len(joined) < nnodes - 1:
                server.settimeout(max(0.1, deadline - time.monotonic()))
                conn, _ = server.accept()
                with conn.makefile("r") as f:
                    hello = json.loads(f.readline() or "{}")
                if hello.get("run_id") == args.rdzv_id:
                    joined[hello["node_rank"]] = conn
                else:
                    conn.close()
            for conn in joined.values():
                with conn:
                    conn.sendall((json.dumps({"master_port": master_port}) + "\n").encode())
        return host, master_port
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        with conn:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            hello = {"run_id": args.rdzv_id, "node_rank": node_rank}
            conn.sendall((json.dumps(hello) + "\n").encode())
            with conn.makefile("r") as f:
                line = f.readline()
        if line:
            return host, json.loads(line)["master_port"]
        time.sleep(0.1)  # a head of another run, or one that went away: try again


def _raise_on_signal(signum, _frame):
    raise SignalException(f"Process {os.getpid()} got signal: {signum}", signal.Signals(signum))


def _close(workers: list[subprocess.Popen], sig: int) -> None:
    for w in workers:
        if w.poll() is None:
            try:
                os.killpg(w.pid, sig)
            except OSError:
                pass
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    while time.monotonic() < deadline and any(w.poll() is None for w in workers):
        time.sleep(MONITOR_INTERVAL_S)
    for w in workers:
        if w.poll() is None:
            try:
                os.killpg(w.pid, signal.SIGKILL)
            except OSError:
                pass
            w.wait()


def main(argv: list[str]) -> None:
    args = _parse(argv)
    if ":" in args.nnodes:
        sys.exit("torchrun stand-in: elastic ranges (--nnodes MIN:MAX) need the real torchrun")
    nnodes, nproc = int(args.nnodes), int(args.nproc_per_node)
    node_rank = args.node_rank
    if node_rank is None:
        node_rank = int(os.environ.get("MLCLOUD_NODE_RANK", "0"))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, _raise_on_signal)
    workers: list[subprocess.Popen] = []
    try:
        master_addr, master_port = _rendezvous(args, nnodes, node_rank)
        world = nnodes * nproc
        for local_rank in range(nproc):
            rank = node_rank * nproc + local_rank
            env = dict(os.environ)
            env.update(
                {
                    "LOCAL_RANK": str(local_rank),
                    "RANK": str(rank),
                    "GROUP_RANK": str(node_rank),
                    "ROLE_RANK": str(rank),
                    "ROLE_NAME": "default",
                    "LOCAL_WORLD_SIZE": str(nproc),
                    "WORLD_SIZE": str(world),
                    "GROUP_WORLD_SIZE": str(nnodes),
                    "ROLE_WORLD_SIZE": str(world),
                    "MASTER_ADDR": master_addr,
                    "MASTER_PORT": str(master_port),
                    "TORCHELASTIC_RESTART_COUNT": "0",
                    "TORCHELASTIC_MAX_RESTARTS": str(args.max_restarts),
                    "TORCHELASTIC_RUN_ID": args.rdzv_id,
                    "TORCHELASTIC_USE_AGENT_STORE": "False",
                    "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get(
                        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"
                    ),
                    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
                }
            )
            if nproc > 1:
                env.setdefault("OMP_NUM_THREADS", "1")
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-u", args.script, *args.script_args],
                    env=env,
                    start_new_session=True,
                )
            )
        while True:
            failures = {
                node_rank * nproc + i: ProcessFailure(i, w.pid, w.returncode)
                for i, w in enumerate(workers)
                if w.poll() not in (None, 0)
            }
            if failures:
                _close(workers, signal.SIGTERM)
                raise ChildFailedError(args.script, failures)
            if all(w.returncode == 0 for w in workers):
                return
            time.sleep(MONITOR_INTERVAL_S)
    except SignalException as e:
        try:
            _close(workers, e.sigval)
        except SignalException:
            # torch's agent: a second signal cuts its shutdown short, and its `finally` shuts
            # the workers down once more (SIGTERM, the same grace); a third one ends it
            _close(workers, signal.SIGTERM)
            raise
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
