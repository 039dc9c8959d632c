"""mlcloud's node-side controller: starts a job detached, follows its log, kills what it started.

Copied to every node at bootstrap and run with the node's python3; standard library only.
Every process a job starts carries MLCLOUD_PROC_TAG=<cluster uid>.<node>.<job> in its
environment, so it can be found and killed even after torchrun put its workers in sessions of
their own or the launcher died.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

TAG = "MLCLOUD_PROC_TAG"
KILLED_CODE = 137


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _interface_for(ip):
    """The interface that carries `ip`: gloo and NCCL must bind there, not to the hostname."""
    if ip.startswith("127."):
        return "lo"
    try:
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3].split("/")[0] == ip:
            return parts[1]
    return None


def start(jobdir):
    """Launch the job's waiter in a new session and print its pid; returns at once."""
    with open(os.path.join(jobdir, "job.json")) as f:
        job = json.load(f)
    env = dict(os.environ)
    env[TAG] = job["tag"]
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "_wait", jobdir],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    print(proc.pid)


def _wait(jobdir):
    with open(os.path.join(jobdir, "job.json")) as f:
        job = json.load(f)
    env = dict(os.environ)
    env.update(job["env"])
    ip = env.get("MLCLOUD_NODE_IP", "")
    if ip and "GLOO_SOCKET_IFNAME" not in env:
        ifname = _interface_for(ip)
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = ifname
            env.setdefault("NCCL_SOCKET_IFNAME", ifname)
    _atomic_write(os.path.join(jobdir, "waiter.pid"), str(os.getpid()))
    with open(os.path.join(jobdir, "output.log"), "ab", buffering=0) as log:
        try:
            child = subprocess.Popen(
                job["argv"],
                cwd=job["cwd"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        except OSError as e:
            log.write(("mlcloud: cannot start {}: {}\n".format(job["argv"][0], e)).encode())
            _atomic_write(os.path.join(jobdir, "exit_code"), "127")
            return

        def forward(signum, _frame):
            try:
                child.send_signal(signum)
            except OSError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        code = child.wait()
    _atomic_write(os.path.join(jobdir, "exit_code"), str(128 - code if code < 0 else code))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def follow(jobdir):
    """Copy the job's output to stdout until it ends; exit with the job's exit code."""
    log_path = os.path.join(jobdir, "output.log")
    code_path = os.path.join(jobdir, "exit_code")
    pid_path = os.path.join(jobdir, "waiter.pid")
    out = sys.stdout.buffer
    pos = 0
    started = time.time()
    while True:
        done = os.path.exists(code_path)
        if not done and os.path.exists(pid_path):
            with open(pid_path) as f:
                waiter_gone = not _alive(int(f.read()))
        else:
            waiter_gone = not done and time.time() - started > 30
        try:
            with open(log_path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            # hand over whole lines only, unless the job is over
            cut = len(chunk) if (done or waiter_gone) else chunk.rfind(b"\n") + 1
            if cut:
                out.write(chunk[:cut])
                out.flush()
                pos += cut
                continue
        if done:
            with open(code_path) as f:
                sys.exit(int(f.read().strip() or 1))
        if waiter_gone:
            if os.path.exists(code_path):
                continue
            sys.stderr.write("mlcloud: the job's processes were killed (no exit status)\n")
            sys.exit(KILLED_CODE)
        time.sleep(0.1)


def _tagged(prefix):
    """pid -> is-waiter for every process whose environment carries a tag starting with prefix."""
    found = {}
    want = (f"{TAG}={prefix}").encode()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if any(item.startswith(want) for item in env):
            found[int(entry)] = b"_wait" in cmd
    return found


def kill(prefix, grace=10.0):
    """SIGTERM every tagged process, then SIGKILL what is left after `grace` seconds.

    The waiter is killed last, so it can record how its job ended."""
    procs = _tagged(prefix)
    for pid, waiter in procs.items():
        if not waiter:
            _signal(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p, w in procs.items() if not w):
        time.sleep(0.1)
    for _ in range(3):
        rest = _tagged(prefix)
        if not rest:
            break
        for pid, waiter in rest.items():
            if not waiter:
                _signal(pid, signal.SIGKILL)
        time.sleep(0.3)
        for pid, waiter in _tagged(prefix).items():
            if waiter:
                _signal(pid, signal.SIGKILL)
    print(len(procs))


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def cleanup(root, prefix):
    """Stop everything the cluster started on this node and remove its directory."""
    kill(prefix, grace=5.0)
    shutil.rmtree(root, ignore_errors=True)


def freeport():
    """A free port outside the ephemeral range: a port the kernel hands out for bind(0) may
    be taken as the source port of an outgoing connection before torchrun listens on it."""
    import random

    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    candidates = list(range(20000, max(20001, min(low, 30000))))
    random.shuffle(candidates)
    for port in candidates[:200]:
        s = socket.socket()
        try:
            s.bind(("", port))
        except OSError:
            continue
        finally:
            s.close()
        print(port)
        return
    s = socket.socket()
    s.bind(("", 0))
    print(s.getsockname()[1])
    s.close()


GPU_QUERY = (
    "--query-gpu=index,name,uuid,utilization.gpu,utilization.memory,memory.used,"
    "memory.total,power.draw,temperature.gpu"
)


def gpus():
    """Print {"count": N, "model": NAME} for the GPUs this node's processes may use: those
    nvidia-smi lists, narrowed by CUDA_VISIBLE_DEVICES when it is set. None: count 0."""
    try:
        out = subprocess.run(
            ["nvidia-smi", GPU_QUERY, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        rows = (
            [
                [c.strip() for c in line.split(",")]
                for line in out.stdout.splitlines()
                if line.strip()
            ]
            if out.returncode == 0
            else []
        )
    except (OSError, subprocess.SubprocessError):
        rows = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        allowed = {v.strip() for v in visible.split(",") if v.strip()}
        rows = [r for r in rows if len(r) > 2 and (r[0] in allowed or r[2] in allowed)]
    names = [r[1] for r in rows if len(r) > 1]
    print(json.dumps({"count": len(names), "model": names[0] if names else None}))


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "start":
        start(args[0])
    elif cmd == "_wait":
        _wait(args[0])
    elif cmd == "follow":
        follow(args[0])
    elif cmd == "kill":
        kill(args[0], float(args[1]) if len(args) > 1 else 10.0)
    elif cmd == "cleanup":
        cleanup(args[0], args[1])
    elif cmd == "freeport":
        freeport()
    elif cmd == "gpus":
        gpus()
    else:
        sys.exit(f"node_ctl: unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
