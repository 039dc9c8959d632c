"""mlcloud's node agent: watches the node, and shuts it down when nobody else will.

Copied to every node at bootstrap next to node_ctl.py and started detached, one per node, with
the node's interpreter; standard library only. Every poll it samples the GPUs (nvidia-smi),
CPU and memory (/proc) and the job (node_ctl's files, the template's progress.json or the
growth of output.log, and the fraction done the job writes to MLCLOUD_PROGRESS_FILE), keeps
a bounded window of samples on disk, classifies the node (idle, starting, busy, stalled), and
acts: it reports or stops a stalled job, passes a cloud's preemption notice on to the job as
SIGTERM (so it checkpoints), and is the dead-man switch that stops the node when it sits idle,
when the budget deadline passed, or when the controller that attached to it stopped sending
heartbeats. It holds no state the engine needs: everything it decides is in <root>/agent/
(config.json, samples.jsonl, events.jsonl, stopped).
"""

import collections
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import node_ctl  # noqa: E402  (copied beside this file)

WINDOW = 720  # samples kept: an hour at the default poll
EVENTS_MAX = 256 * 1024  # bytes of events.jsonl kept on the node (its newest half once past)
STOP_GRACE = 60.0  # seconds a job has to checkpoint after SIGTERM before it is killed
CLOUDS = ("aws", "gce")
DEFAULT_METADATA = {"aws": "http://169.254.169.254", "gce": "http://metadata.google.internal"}


def _num(text):
    """A number from nvidia-smi's CSV, None for [N/A] and [Not Supported]."""
    try:
        return float(text)
    except ValueError:
        return None


def parse_gpus(rows):
    """node_ctl.GPU_QUERY rows (index, name, uuid, util, mem util, mem used, mem total, power,
    temperature) as the samples' GPU records."""
    gpus = []
    for r in rows:
        if len(r) < 8:
            continue
        gpus.append(
            {
                "index": int(r[0]),
                "util": _num(r[3]),
                "mem_used": _num(r[5]),
                "mem_total": _num(r[6]),
                "power": _num(r[7]),
            }
        )
    return gpus


def read_cpu():
    """(busy, total) jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def read_memory():
    """(used, total) MiB: what is not available to new work is used."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
    total = info.get("MemTotal", 0)
    return (total - info.get("MemAvailable", info.get("MemFree", 0))) // 1024, total // 1024


def _json_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_progress(path):
    """The job's progress as a fraction 0..1 from the file its MLCLOUD_PROGRESS_FILE names,
    which holds JSON {"done": N, "total": M} (numbers, 0 <= N, 0 < M; past M reads as 1).
    None when there is no such file, or it is being written, or it says something else."""
    d = _json_file(path) if path else None
    if not isinstance(d, dict):
        return None
    done, total = d.get("done"), d.get("total")
    numbers = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in (done, total)
    )
    if not numbers or done < 0 or total <= 0:
        return None
    return min(done / total, 1.0)


def current_job(root):
    """The newest job of this node: {"id", "state", "step", "progress", "log_bytes",
    "started"} or None. progress: the fraction the job wrote to MLCLOUD_PROGRESS_FILE."""
    jobs = os.path.join(root, "jobs")
    try:
        ids = [int(d) for d in os.listdir(jobs) if d.isdigit()]
    except OSError:
        return None
    if not ids:
        return None
    job_id = max(ids)
    jobdir = os.path.join(jobs, str(job_id))
    state = node_ctl.summary(jobdir)["state"]
    job = {
        "id": job_id,
        "state": state,
        "step": None,
        "progress": None,
        "log_bytes": None,
        "started": None,
    }
    if state != "running":
        return job
    try:
        job["started"] = os.path.getmtime(os.path.join(jobdir, "waiter.pid"))
        job["log_bytes"] = os.path.getsize(os.path.join(jobdir, "output.log"))
    except OSError:
        pass
    spec = _json_file(os.path.join(jobdir, "job.json")) or {}
    progress = spec.get("checkpoint_dir") and _json_file(
        os.path.join(spec["checkpoint_dir"], "progress.json")
    )
    if isinstance(progress, dict) and isinstance(progress.get("step"), int):
        job["step"] = progress["step"]
    env = spec.get("env") if isinstance(spec.get("env"), dict) else {}
    job["progress"] = read_progress(env.get("MLCLOUD_PROGRESS_FILE"))
    return job


# Classification: pure, over the window of samples (newest last), so tests replay real traces.


def _progress(sample):
    job = sample.get("job") or {}
    return job.get("step") if job.get("step") is not None else job.get("log_bytes")


def classify(samples, now, stall_seconds, idle_util):
    """(verdict, reason) for the newest sample.

    No running job: "idle" while every GPU is under idle_util, else "busy". A running job is
    "stalled" when, for all of the last stall_seconds, its GPUs held memory at 0% or its
    progress signal (step, else log size) did not move; "starting" while it is younger than
    that and shows no work yet; else "busy" (a data-loader-bound, bursty or pausing job is
    still working)."""
    cur = samples[-1]
    job = cur.get("job")
    gpus = cur.get("gpus") or []
    if not job or job.get("state") != "running":
        if all((g.get("util") or 0) < idle_util for g in gpus):
            return "idle", "no job running" + (f", GPUs under {idle_util:g}%" if gpus else "")
        return "busy", "no job, but the GPUs are in use"
    mine = [s for s in samples if (s.get("job") or {}).get("id") == job["id"]]
    since = now - stall_seconds
    started = job.get("started") or mine[0]["time"]
    # the window reaches back to a sample taken at or before its edge: evidence for all of it
    edge = [i for i, s in enumerate(mine) if s["time"] <= since]
    if edge and started <= since:
        window = mine[edge[-1] :]
        held_idle = all(
            s.get("gpus")
            and all((g.get("util") or 0) < 1 for g in s["gpus"])
            and any((g.get("mem_used") or 0) > 0 for g in s["gpus"])
            for s in window
        )
        if held_idle:
            return "stalled", f"GPU memory held at 0% utilization for {stall_seconds:g}s"
        marks = {_progress(s) for s in window}
        if len(marks) == 1 and None not in marks:
            return "stalled", f"no progress (step or log) for {stall_seconds:g}s"
    working = any((g.get("util") or 0) >= 1 for g in gpus) or (
        len(mine) > 1 and _progress(mine[-1]) != _progress(mine[-2])
    )
    if not working and now - started < stall_seconds:
        return "starting", "job started, no work seen yet"
    return "busy", "job running"


def deadman(now, cfg, idle_since, silence):
    """(kind, reason) when the node must stop, else None: past the budget deadline, no
    controller heartbeat for heartbeat_minutes (silence: seconds since the last one arrived,
    None until a controller attached), or idle since idle_since for idle_minutes."""
    deadline = cfg.get("deadline")
    if deadline is not None and now >= deadline:
        return "budget_stop", "the budget deadline passed (autoscale.max_cost spent)"
    beat = cfg.get("heartbeat_minutes", 15) * 60
    if silence is not None and silence >= beat:
        return "heartbeat_lost", (
            f"no heartbeat from the controller for {silence / 60:.1f} min "
            f"(heartbeat_minutes: {cfg.get('heartbeat_minutes', 15):g})"
        )
    idle = cfg.get("idle_minutes", 30) * 60
    if idle_since is not None and now - idle_since >= idle:
        return "idle_teardown", (
            f"idle for {(now - idle_since) / 60:.1f} min (idle_minutes: "
            f"{cfg.get('idle_minutes', 30):g}): no job running, GPUs under "
            f"{cfg.get('idle_util_percent', 5):g}%"
        )
    return None


# Preemption notices, from the instance metadata service of the cloud the node runs on.


def _http(method, url, headers, timeout=1.0):
    """(status, body) of a metadata request; status 0 when nothing answered."""
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, ValueError):
        return 0, ""


def _ec2_metadata(base, path):
    """(status, body) of EC2's latest/meta-data/<path> the IMDSv2 way: a session token first
    (none given: that request's status, no body)."""
    status, token = _http(
        "PUT", f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    if status != 200:
        return status, ""
    return _http("GET", f"{base}/latest/meta-data/{path}", {"X-aws-ec2-metadata-token": token})


def _gce_metadata(base, path):
    """(status, body) of GCE's computeMetadata/v1/instance/<path>."""
    return _http("GET", f"{base}/computeMetadata/v1/instance/{path}", {"Metadata-Flavor": "Google"})


def preemption_notice(provider, base):
    """The notice's text if the cloud announced this node's reclaim, else None. EC2:
    spot/instance-action (404 until a notice); GCE: instance/preempted turns TRUE."""
    if provider == "aws":
        status, body = _ec2_metadata(base, "spot/instance-action")
        return f"EC2 spot instance-action {body.strip()}" if status == 200 else None
    if provider == "gce":
        status, body = _gce_metadata(base, "preempted")
        return (
            "GCE instance/preempted is TRUE" if status == 200 and body.strip() == "TRUE" else None
        )
    return None


def instance_id(provider, base):
    """The id the cloud's metadata server gives this machine, or None (not that cloud)."""
    if provider == "aws":
        status, body = _ec2_metadata(base, "instance-id")
    elif provider == "gce":
        status, body = _gce_metadata(base, "name")
    else:
        return None
    return body.strip() if status == 200 else None


def _metadata_base(cfg):
    provider = cfg.get("provider")
    return (cfg.get("metadata") or {}).get(provider) or DEFAULT_METADATA.get(provider, "")


def may_power_off(cfg):
    """Only the very instance the engine made, as its cloud's metadata server confirms: a
    config copied elsewhere (a test machine, an ssh host) never powers a machine off."""
    node_id = cfg.get("node_id")
    return bool(node_id) and instance_id(cfg.get("provider"), _metadata_base(cfg)) == node_id


def power_off(minutes=0):
    """`shutdown -h now` (or +minutes: armed at boot, it outlives the agent)."""
    when = f"+{minutes}" if minutes else "now"
    for argv in (["sudo", "-n", "shutdown", "-h", when], ["shutdown", "-h", when]):
        try:
            if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
                return True
        except (OSError, subprocess.SubprocessError):
            continue
    return False


class NodeRemoved(Exception):
    """The node's directory went away under the agent (teardown): it must end."""


class Agent:
    """The loop's memory: the window of samples and what was already said or done."""

    def __init__(self, root, clock=time.monotonic):
        self.root = root
        self.clock = clock  # heartbeats are timed on it: no other machine's clock is read
        self.beat = None  # (inode, mtime_ns) of the heartbeat file last seen
        self.beat_at = None  # self.clock() when that heartbeat arrived
        self.dir = os.path.join(root, "agent")
        self.samples = collections.deque(maxlen=WINDOW)
        self.lines = 0  # lines in samples.jsonl, to trim it now and then
        self.cpu = read_cpu()
        self.idle_since = None
        self.reported_stall = None  # the job whose stall was already told
        self.noticed = False
        self.has_smi = True
        self.made = set()  # the files this agent wrote (see _append)

    def config(self):
        return _json_file(os.path.join(self.dir, "config.json"))

    def event(self, cfg, kind, message, now=None):
        record = {
            "time": now or time.time(),
            "kind": kind,
            "node": cfg.get("node"),
            "message": message,
        }
        self._append("events.jsonl", json.dumps(record) + "\n")
        self._trim_events()

    def _trim_events(self):
        """Keep events.jsonl under EVENTS_MAX bytes: past it, its newest half stays (whole
        lines). Readers take its tail only (EVENTS_READ bytes) and merge each event once, so
        what was trimmed was read long before."""
        path = os.path.join(self.dir, "events.jsonl")
        try:
            if os.path.getsize(path) <= EVENTS_MAX:
                return
            with open(path, "rb") as f:
                f.seek(-(EVENTS_MAX // 2), os.SEEK_END)
                tail = f.read()
        except OSError:
            return
        node_ctl._atomic_write(path, tail[tail.find(b"\n") + 1 :].decode(errors="replace"))

    def _append(self, name, text):
        """Append to one of the agent's files. Only its first write may create it: a file gone
        since means the node's directory is being removed (teardown), and writing again would
        leave it half removed."""
        flags = os.O_WRONLY | os.O_APPEND | (0 if name in self.made else os.O_CREAT)
        try:
            fd = os.open(os.path.join(self.dir, name), flags, 0o600)
        except FileNotFoundError:
            raise NodeRemoved() from None
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        self.made.add(name)

    def gpus(self):
        if not self.has_smi:
            return []
        try:
            out = subprocess.run(
                ["nvidia-smi", node_ctl.GPU_QUERY, "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except FileNotFoundError:
            self.has_smi = False  # no driver here: never ask again
            return []
        except (OSError, subprocess.SubprocessError):
            return []
        return parse_gpus(
            node_ctl.visible(node_ctl.csv_rows(out.stdout)) if out.returncode == 0 else []
        )

    def sample(self, now):
        busy, total = read_cpu()
        d_busy, d_total = busy - self.cpu[0], total - self.cpu[1]
        self.cpu = (busy, total)
        used, mem_total = read_memory()
        return {
            "time": now,
            "gpus": self.gpus(),
            "cpu_percent": round(100.0 * d_busy / d_total, 1) if d_total else 0.0,
            "mem_used_mb": used,
            "mem_total_mb": mem_total,
            "job": current_job(self.root),
        }

    def record(self, sample):
        self.samples.append(sample)
        path = os.path.join(self.dir, "samples.jsonl")
        line = json.dumps(sample) + "\n"
        if self.lines >= 2 * WINDOW:  # trim: keep the window, rewrite once in a while
            node_ctl._atomic_write(path, "".join(json.dumps(s) + "\n" for s in self.samples))
            self.lines = len(self.samples)
            return
        self._append("samples.jsonl", line)
        self.lines += 1

    def step(self, cfg, now):
        """One poll: sample, classify, act. Returns the stop (kind, reason) that fired, if any."""
        sample = self.sample(now)
        self.samples.append(sample)
        verdict, why = classify(
            list(self.samples),
            now,
            cfg.get("stall_minutes", 10) * 60,
            cfg.get("idle_util_percent", 5),
        )
        self.samples.pop()
        sample["verdict"] = verdict
        self.record(sample)
        job = sample["job"]
        if verdict == "idle":
            if self.idle_since is None:
                self.idle_since = now
        else:
            self.idle_since = None
        if verdict == "stalled" and self.reported_stall != job["id"]:
            self.reported_stall = job["id"]
            stop = cfg.get("on_stall") == "stop"
            self.event(
                cfg,
                "stall",
                f"job {job['id']} stalled: {why}" + ("; stopping it" if stop else ""),
                now,
            )
            if stop:
                # the rule's name goes with the job's end, to the line `train` ends with
                jobdir = os.path.join(self.root, "jobs", str(job["id"]))
                if os.path.isdir(jobdir):
                    node_ctl._atomic_write(
                        os.path.join(jobdir, "stopped"),
                        json.dumps({"time": now, "kind": "stall", "reason": why}),
                    )
                node_ctl.kill(self._job_tag(cfg, job["id"]), grace=STOP_GRACE)
        provider = cfg.get("provider")
        if provider in CLOUDS and cfg.get("spot") and not self.noticed:
            notice = preemption_notice(provider, _metadata_base(cfg))
            if notice:
                self.noticed = True
                running = job and job["state"] == "running"
                self.event(
                    cfg,
                    "preemption",
                    f"preemption notice ({notice})"
                    + (f"; SIGTERM to job {job['id']} so it checkpoints" if running else ""),
                    now,
                )
                if running:
                    self.terminate_job(cfg, job["id"])
        return deadman(now, cfg, self.idle_since, self.silence())

    def silence(self):
        """Seconds since the controller's last heartbeat arrived, None while none is there
        (never attached, or detached). A heartbeat is a new file each time (written beside,
        then renamed): a new inode or mtime is a new beat, timed on this node's monotonic
        clock, so a controller whose clock is off by any amount reads the same. What the file
        says (the controller's time) is only for people."""
        try:
            st = os.stat(os.path.join(self.dir, "heartbeat"))
        except OSError:
            self.beat = self.beat_at = None
            return None
        seen = (st.st_ino, st.st_mtime_ns)
        if seen != self.beat:
            # the first one this agent sees may have arrived before it started: its age on
            # this node's own wall clock (the file's mtime was set here)
            age = 0.0 if self.beat is not None else max(0.0, time.time() - st.st_mtime)
            self.beat, self.beat_at = seen, self.clock() - age
        return self.clock() - self.beat_at

    @staticmethod
    def _job_tag(cfg, job_id):
        return f"{cfg['tag']}{job_id}."

    def terminate_job(self, cfg, job_id):
        """SIGTERM to the job's processes now (torchrun passes it on; the template saves)."""
        for pid, waiter in node_ctl._tagged(self._job_tag(cfg, job_id)).items():
            if not waiter:
                node_ctl._signal(pid, signal.SIGTERM)

    def shut_down(self, cfg, kind, reason, now, grace=STOP_GRACE):
        """Record why, then stop: the job gets SIGTERM and `grace` seconds to checkpoint, every
        process of the cluster on this node ends, and a machine mlcloud owns powers off (the
        instance terminates); an ssh host or this machine (local) is never powered off."""
        node_ctl._atomic_write(
            os.path.join(self.dir, "stopped"),
            json.dumps({"time": now, "kind": kind, "reason": reason}),
        )
        cloud = cfg.get("owns_machines") and may_power_off(cfg)
        self.event(
            cfg,
            kind,
            f"{reason}; "
            + ("powering the node off" if cloud else "stopping the cluster's processes"),
            now,
        )
        node_ctl.kill(cfg["tag"], grace=grace)
        if cloud:
            power_off()


def rearm(cfg, armed):
    """A new budget deadline (the controller resized the cluster) also moves the shutdown the
    OS has scheduled at start, on an EC2 node this agent may power off: `shutdown -h +M`
    replaces the pending one. Returns the deadline now armed."""
    due = cfg.get("deadline")
    if due and due != armed and cfg.get("provider") == "aws" and may_power_off(cfg):
        power_off(max(1, int((due - time.time()) // 60)))
    return due


def run(root):
    """The agent's loop; ends when the node stopped or its directory went away (cleanup)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    agent = Agent(root)
    cfg = agent.config()
    if cfg is None:
        sys.exit("agent: no config.json")
    if os.path.exists(os.path.join(agent.dir, "stopped")):
        return  # this node already stopped itself; a restart must not revive it
    agent.event(cfg, "agent_start", f"agent {os.getpid()} watching node {cfg.get('node')}")
    armed = cfg.get("deadline")  # start() armed it
    while True:
        cfg = agent.config() or cfg
        if not os.path.isdir(agent.dir):
            return
        armed = rearm(cfg, armed)
        now = time.time()
        try:
            fired = agent.step(cfg, now)
        except NodeRemoved:
            return
        if fired:
            agent.shut_down(cfg, fired[0], fired[1], now)
            return
        time.sleep(max(0.2, cfg.get("poll_seconds", 5) - (time.time() - now)))


def _is_agent(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"agent.py" in f.read() and node_ctl._alive(pid)
    except OSError:
        return False


def start(root):
    """Start the node's agent unless one runs (pid file, checked under a lock); print its pid."""
    root = os.path.abspath(root)
    adir = os.path.join(root, "agent")
    os.makedirs(adir, mode=0o700, exist_ok=True)
    with open(os.path.join(adir, "agent.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pid_path = os.path.join(adir, "agent.pid")
        try:
            with open(pid_path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            pid = None
        if pid and _is_agent(pid):
            print(pid)
            return
        cfg = _json_file(os.path.join(adir, "config.json")) or {}
        # untagged, so stopping a job (or the agent's own stop of the node) never reaches it;
        # teardown finds it by its pid file (node_ctl cleanup)
        env = {k: v for k, v in os.environ.items() if k != node_ctl.TAG}
        proc = node_ctl._spawn(__file__, ["run", root], env, cwd=root)
        node_ctl._atomic_write(pid_path, str(proc.pid))
        print(proc.pid)
    due = cfg.get("deadline")
    if due and cfg.get("owns_machines") and may_power_off(cfg):
        # the budget also holds if the agent dies: a shutdown the OS has scheduled
        power_off(max(1, int((due - time.time()) // 60)))


def stop(root, kind, reason, grace):
    """A controller's rule stops the node (idle, budget) the way this agent stops it itself:
    the running agent ends first (it must not act on what it sees ending), then the same
    shut_down, so the stop record and the event are where `status` and `events` look. A node
    that stopped itself already keeps its own record."""
    root = os.path.abspath(root)
    if os.path.exists(os.path.join(root, "agent", "stopped")):
        return
    node_ctl.stop_agent(root)
    agent = Agent(root)
    cfg = agent.config()
    if cfg is None:
        sys.exit("agent: no config.json")
    agent.shut_down(cfg, kind, reason, time.time(), grace)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "start":
        start(args[0])
    elif cmd == "run":
        run(args[0])
    elif cmd == "stop":
        stop(args[0], args[1], args[2], float(args[3]))
    else:
        sys.exit(f"agent: unknown command {cmd!r}")
