"""mlcloud's node-side controller: starts a job detached, follows its log, kills what it started,
and tells how a job ended (the node is where a job's truth lives).

Copied to every node at bootstrap and run with the node's interpreter; standard library only
(`torchrun` alone imports torch). Every process a job starts carries
MLCLOUD_PROC_TAG=<cluster uid>.<node>.<job> in its environment, so it can be found and killed
even after torchrun put its workers in sessions of their own or the launcher died.

A job directory holds job.json (what to run), waiter.pid, output.log, and once the job ended
exit_code; failure.json names the first failing rank; `cancelled` marks a job stopped on request.

With MLCLOUD_CHECKPOINT_URI in the job's environment the waiter also runs checkpoints.py
(beside this file): its restore before the job's processes start, its uploader beside them,
tagged like them, told the job's end by its stdin closing and given FINAL_UPLOAD_S for its
last pass before the job's end is recorded.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

TAG = "MLCLOUD_PROC_TAG"
CKPT = "checkpoints.py"  # beside this file: the node side of durable checkpoints
# how mlcloud runs this file (remote/shell.py STDLIB_PY: this file cannot import it), and so
# its own waiter, reaper and the fan-out's forget
STDLIB_PY = ("-I", "-S")
KILLED_CODE = 137
FINAL_UPLOAD_S = 300.0  # the uploader's last pass after the job's processes ended, at most
END_MARK = "mlcloud-end "  # follow's last stderr line: the job's end on this node, as JSON


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


def _spawn(script, args, env, cwd=None, flags=()):
    """Start `python FLAGS script args` detached (the agent's too): a session of its own, no
    terminal, no inherited descriptors, so it outlives whoever started it."""
    return subprocess.Popen(
        [sys.executable, *flags, os.path.abspath(script), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd=cwd,
    )


def start(jobdir):
    """Launch the job's waiter in a new session, and its reaper in another; print the waiter's
    pid and return at once."""
    if os.path.exists(os.path.join(jobdir, "cancelled")):
        sys.exit("node_ctl: the job was cancelled before it started")
    with open(os.path.join(jobdir, "job.json")) as f:
        job = json.load(f)
    env = dict(os.environ)
    env[TAG] = job["tag"]
    proc = _spawn(__file__, ["_wait", jobdir], env, flags=STDLIB_PY)
    # written here too, so the job is never seen started without a waiter to check
    _atomic_write(os.path.join(jobdir, "waiter.pid"), str(proc.pid))
    # the reaper carries no tag: killing the job's processes must not kill it
    untagged = {k: v for k, v in os.environ.items() if k != TAG}
    _spawn(__file__, ["_reap", jobdir, job["tag"]], untagged, flags=STDLIB_PY)
    print(proc.pid)


def _reap(jobdir, prefix):
    """Once the waiter is gone, kill what is left of the job: torchrun puts its workers in
    sessions of their own, so a killed waiter (a node_ctl crash, its process group killed)
    would otherwise leave them running until `down`."""
    with open(os.path.join(jobdir, "waiter.pid")) as f:
        waiter = int(f.read())
    while _alive(waiter):
        time.sleep(0.5)
    if _tagged(prefix):
        kill(prefix, grace=5.0)


def _wait(jobdir):
    with open(os.path.join(jobdir, "job.json")) as f:
        job = json.load(f)
    env = dict(os.environ)
    env.update(job["env"])
    env["MLCLOUD_JOB_DIR"] = os.path.abspath(jobdir)
    ip = env.get("MLCLOUD_NODE_IP", "")
    if ip and "GLOO_SOCKET_IFNAME" not in env:
        ifname = _interface_for(ip)
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = ifname
            env.setdefault("NCCL_SOCKET_IFNAME", ifname)
    _atomic_write(os.path.join(jobdir, "waiter.pid"), str(os.getpid()))
    running = []  # what a signal to the waiter goes on to

    def forward(signum, _frame):
        for p in running:
            try:
                p.send_signal(signum)
            except OSError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    sync = None
    if env.get("MLCLOUD_CHECKPOINT_URI") and env.get("MLCLOUD_CHECKPOINT_DIR"):
        sync = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), CKPT)]
    with open(os.path.join(jobdir, "output.log"), "ab", buffering=0) as log:

        def run(argv, cwd, stdin=subprocess.DEVNULL):
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=log, stderr=log)
            running.append(proc)
            return proc

        if sync:
            restored = run([*sync, "restore"], jobdir).wait()
            if restored < 0 or os.path.exists(os.path.join(jobdir, "cancelled")):
                # stopped while it restored: the job's processes never start
                _atomic_write(os.path.join(jobdir, "exit_code"), str(shell_code(restored) or 143))
                return
        try:
            child = run(job["argv"], job["cwd"])
        except OSError as e:
            log.write(("mlcloud: cannot start {}: {}\n".format(job["argv"][0], e)).encode())
            _atomic_write(os.path.join(jobdir, "exit_code"), "127")
            return
        uploader = run([*sync, "upload"], jobdir, subprocess.PIPE) if sync else None
        code = child.wait()
        if uploader is not None:
            _last_upload(uploader, log)
    _atomic_write(os.path.join(jobdir, "exit_code"), str(shell_code(code)))


def _last_upload(uploader, log):
    """Tell the uploader the job ended (its stdin closes) and give its last pass a bounded
    time: the job's end waits for the newest checkpoint, never for a bucket that hangs."""
    uploader.stdin.close()
    try:
        uploader.wait(timeout=FINAL_UPLOAD_S)
    except subprocess.TimeoutExpired:
        uploader.kill()
        uploader.wait()
        log.write(f"checkpoints: the last upload did not end in {FINAL_UPLOAD_S:g} s\n".encode())


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
        if done or waiter_gone:
            if not done and os.path.exists(code_path):
                continue
            end = summary(jobdir)
            if not done:
                sys.stderr.write("mlcloud: the job's processes were killed (no exit status)\n")
            sys.stderr.write(END_MARK + json.dumps(end) + "\n")
            sys.exit(KILLED_CODE if end["exit_code"] is None else end["exit_code"])
        time.sleep(0.1)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def summary(jobdir):
    """How the job stands on this node: state is "not started" (no waiter ever ran), "running",
    "ended" (the waiter recorded exit_code) or "killed" (the waiter died without a record)."""
    code = _read(os.path.join(jobdir, "exit_code"))
    pid = _read(os.path.join(jobdir, "waiter.pid"))
    failure = _read(os.path.join(jobdir, "failure.json"))
    if code is not None:
        state, exit_code = "ended", int(code.strip() or 1)
    elif pid is None:
        state, exit_code = "not started", None
    elif _alive(int(pid)):
        state, exit_code = "running", None
    else:
        state, exit_code = "killed", KILLED_CODE
    ended_at = None
    for name in ("exit_code", "output.log", "waiter.pid"):  # killed: its last sign of life
        if state in ("ended", "killed") and ended_at is None:
            try:
                ended_at = os.path.getmtime(os.path.join(jobdir, name))
            except OSError:
                pass
    return {
        "state": state,
        "exit_code": exit_code,
        "ended_at": ended_at,
        "failure": json.loads(failure) if failure else None,
        "cancelled": os.path.exists(os.path.join(jobdir, "cancelled")),
        "stopped": stopped_by(jobdir) if state in ("ended", "killed") else None,
    }


def stopped_by(jobdir):
    """The rule that stopped the job here, {"kind", "reason"}, or None: the agent's mark in
    the job's directory (a stall stop), else the node's own stop record (idle, budget, a lost
    controller: agent/stopped), which ends every job the node runs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(jobdir)))
    for path in (os.path.join(jobdir, "stopped"), os.path.join(root, "agent", "stopped")):
        text = _read(path)
        if text is None:
            continue
        try:
            d = json.loads(text)
            return {"kind": str(d["kind"]), "reason": str(d.get("reason") or "")}
        except (ValueError, KeyError, TypeError):
            continue
    return None


def cancel(jobdir, prefix, grace):
    """Mark the job cancelled (so its end is told as such, and a late start refuses), then
    stop its processes. A job that already ended here keeps its end: its exit code is the
    truth, a late cancel does not relabel it."""
    if os.path.exists(os.path.join(jobdir, "exit_code")):
        print(0)
        return
    os.makedirs(jobdir, exist_ok=True)
    with open(os.path.join(jobdir, "cancelled"), "w"):
        pass
    kill(prefix, grace)


def stop(jobdir, prefix, grace, kind, reason):
    """A rule (stall, budget, idle) stops the job: its name is marked beside the job (read by
    `stopped_by`, so the job's end names it), then the job's processes stop. A job that ended
    here already keeps its own end."""
    if os.path.exists(os.path.join(jobdir, "exit_code")):
        print(0)
        return
    marker = os.path.join(jobdir, "stopped")
    if os.path.isdir(jobdir) and not os.path.exists(marker):
        _atomic_write(marker, json.dumps({"time": time.time(), "kind": kind, "reason": reason}))
    kill(prefix, grace)


def _bind_stores(ip):
    """Make every TCPStore this agent hosts (the c10d rendezvous store, and the store its
    workers share) listen on the node's address only: torch binds them to every interface,
    and they take unauthenticated writes."""
    import socket as _socket

    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    real = dist.TCPStore

    def store(host_name, port, *args, is_master=False, **kwargs):
        if is_master and "master_listen_fd" not in kwargs:
            family = _socket.AF_INET6 if ":" in ip else _socket.AF_INET
            s = _socket.socket(family, _socket.SOCK_STREAM)
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
            s.listen(1024)
            kwargs["master_listen_fd"] = s.detach()
        return real(host_name, port, *args, is_master=is_master, **kwargs)

    dist.TCPStore = store
    c10d_rendezvous_backend.TCPStore = store


# The test suite's torchrun stand-in (tests/torchrun_standin.py: the same arguments, workers,
# environment and failures, without torch), for tests whose subject is not torch. The one place
# mlcloud reads this variable; nothing sets it outside the tests (docs/architecture.md, Testing).
TEST_TORCHRUN = "MLCLOUD_TEST_TORCHRUN"


def _launcher():
    """(main, ChildFailedError, SignalException) of torch.distributed.run, or of the stand-in
    named by MLCLOUD_TEST_TORCHRUN."""
    standin = os.environ.get(TEST_TORCHRUN)
    if standin:
        import importlib.util

        spec = importlib.util.spec_from_file_location("torchrun_standin", standin)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main, mod.ChildFailedError, mod.SignalException
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    ip = os.environ.get("MLCLOUD_NODE_IP")
    if ip:
        _bind_stores(ip)
    return run.main, ChildFailedError, SignalException


def torchrun(args):
    """torchrun, run in this process so that its stores bind to the node's address and the
    first failing rank's own exit code (not torchrun's 1) becomes the job's, in failure.json."""
    run_main, ChildFailedError, SignalException = _launcher()
    try:
        run_main(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        signame = failure.signal_name() if code < 0 else None
        code = shell_code(code)
        record = {
            "rank": rank,
            "local_rank": failure.local_rank,
            "exit_code": code,
            "signal": signame,
            "time": failure.timestamp,
        }
        jobdir = os.environ.get("MLCLOUD_JOB_DIR")
        if jobdir:
            _atomic_write(os.path.join(jobdir, "failure.json"), json.dumps(record))
        sys.exit(code or 1)
    except SignalException as e:  # stopped (cancel, down): torchrun has stopped its workers
        sys.exit(128 + int(e.sigval))


def shell_code(returncode):
    """A process's exit as a shell reports it: killed by signal N is 128+N (Python says -N,
    which as an exit status would wrap to 256-N)."""
    return 128 - returncode if returncode < 0 else returncode


def exec_(cwd, line):
    """Run a shell line in cwd, passing its output on; return when the shell exits, even if it
    left background children holding its output (`sleep 300 &` must not hold the caller)."""
    import selectors

    try:
        proc = subprocess.Popen(
            ["bash", "-c", line],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as e:
        sys.exit(f"node_ctl: cannot run in {cwd}: {e.strerror}")
    sinks = {proc.stdout.fileno(): sys.stdout.buffer, proc.stderr.fileno(): sys.stderr.buffer}
    sel = selectors.DefaultSelector()
    for fd in sinks:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)

    def pump(fd):
        """Copy what fd holds now; False once it is at its end."""
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return True
            if not data:
                sel.unregister(fd)
                del sinks[fd]
                return False
            sinks[fd].write(data)
            sinks[fd].flush()

    while sinks:
        exited = proc.poll() is not None
        for key, _ in sel.select(timeout=0.1):
            pump(key.fd)
        if exited:  # what the shell wrote is in the pipes now; its children may never close them
            for fd in list(sinks):
                pump(fd)
            break
    sys.exit(shell_code(proc.wait()))


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


def stop_agent(root):
    """End the node agent (agent.py), found by its pid file: it carries no tag, so that
    stopping a job never reaches it. With the pid file gone (the node's directory removed),
    by its command line, which names its root: `python ROOT/bin/agent.py run ROOT`."""
    try:
        with open(os.path.join(root, "agent", "agent.pid")) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            mine = b"agent.py" in f.read()  # not a process that took a dead agent's pid
    except (OSError, ValueError):
        for pid in _agents_of(root):
            _signal(pid, signal.SIGKILL)
        return
    if mine:
        _signal(pid, signal.SIGKILL)


def _agents_of(root):
    root = os.path.realpath(root)
    want = [os.path.join(root, "bin", "agent.py").encode(), b"run", root.encode()]
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if args[1:] == want:
            found.append(int(entry))
    return found


def cleanup(root, prefix):
    """Stop everything the cluster started on this node, its agent first (so it does not act
    on what it sees ending); the directory is the provider's to remove."""
    stop_agent(root)
    _forget_peer_key(root)
    kill(prefix, grace=5.0)


def _forget_peer_key(root):
    """Take back the line the workdir fan-out added to sshd's authorized keys (fanout.py)."""
    fanout = os.path.join(root, "bin", "fanout.py")
    if os.path.isfile(fanout):
        subprocess.run([sys.executable, *STDLIB_PY, fanout, "forget", root], check=False)


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


def csv_rows(text):
    """nvidia-smi's `--format=csv,noheader` output as lists of stripped fields."""
    return [[c.strip() for c in line.split(",")] for line in text.splitlines() if line.strip()]


def visible(rows):
    """GPU_QUERY rows narrowed to CUDA_VISIBLE_DEVICES (by index or uuid) when it is set."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is None:
        return rows
    allowed = {v.strip() for v in devices.split(",") if v.strip()}
    return [r for r in rows if len(r) > 2 and (r[0] in allowed or r[2] in allowed)]


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
        rows = csv_rows(out.stdout) if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        rows = []
    names = [r[1] for r in visible(rows) if len(r) > 1]
    print(json.dumps({"count": len(names), "model": names[0] if names else None}))


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "start":
        start(args[0])
    elif cmd == "_wait":
        _wait(args[0])
    elif cmd == "_reap":
        _reap(args[0], args[1])
    elif cmd == "torchrun":
        torchrun(args)
    elif cmd == "follow":
        follow(args[0])
    elif cmd == "probe":
        print(json.dumps(summary(args[0])))
    elif cmd == "cancel":
        cancel(args[0], args[1], float(args[2]))
    elif cmd == "stop":
        stop(args[0], args[1], float(args[2]), args[3], args[4])
    elif cmd == "exec":
        exec_(args[0], args[1])
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
