"""Bootstrap: make a new node ready in one round trip (directories, node_ctl.py and the
node-side programs beside it, the node agent and its config, the Python that has torch, GPUs),
and the agent's budget deadline."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from mlcloud import state
from mlcloud.parallel import fan_out, pause
from mlcloud.providers.base import (
    ClusterRef,
    Node,
    Provider,
    SshOptions,
)
from mlcloud.remote import shell
from mlcloud.remote.shell import CTL, DIR, node_number, path_arg, quote, tag
from mlcloud.remote.transport import (
    LostError,
    RemoteError,
    Transport,
    UnreachableError,
    check,
)
from mlcloud.spec.cost import Interval, accrued, hourly
from mlcloud.spec.task import AutoscaleSpec

# How long a booting node's "authentication refused" is waited out (cloud-init installing the
# key): past that it is a wrong user or key, and the user hears it now, not at the boot timeout.
AUTH_WINDOW = 90.0
MARK = "@mlcloud:"  # bootstrap output lines carry it; anything else (a chatty ~/.bashrc) is noise


def bootstrap(
    provider: Provider,
    ref: ClusterRef,
    nodes: list[Node],
    ssh: SshOptions,
    autoscale: AutoscaleSpec | None = None,
    due: float | None = None,
    spot: bool = False,
    cancelled: Callable[[], bool] | None = None,
) -> list[state.NodeRecord]:
    """Make each node's directories, install the node controller and the node agent (its
    config: autoscale's rules and the budget deadline `due`), find the Python that has torch,
    detect the GPUs and start the agent with that Python, in one round trip per node, waiting
    for a new machine's sshd; a root under ~/ is resolved. Once `cancelled()` is true (the
    cluster is going down) no node is bootstrapped or waited for any more: RemoteError."""
    from mlcloud import templates

    # node_ctl.py runs checkpoints.py, which imports send.py: all three in bin/
    programs = [(shell.CTL, "node_ctl.py"), (shell.AGENT, "agent.py")] + [
        (f"bin/{name}", name) for name in ("checkpoints.py", "send.py")
    ]
    sources = [(dest, templates.path(name).read_bytes()) for dest, name in programs]
    auto = autoscale or AutoscaleSpec()

    def one(i: int) -> state.NodeRecord:
        node = nodes[i]
        # the node's number, fixed when it was made (its `node-K`): the agent names it so and
        # tags its processes as launch tags the node's jobs, wherever the node ends up placed
        number = node_number(node.root)
        number = i if number is None else number  # a root without one: made before numbers
        t = provider.transport(ref, node, f"node{number}", ssh)
        pythons = (ssh.python,) if ssh.python else provider.pythons  # ssh.python: the user's word
        conf = config(
            auto,
            provider.name,
            ref.uid,
            number,
            node.node_id,
            spot,
            due,
            provider.capabilities.owns_machines,
        )
        cmd = _bootstrap_script(node.root, pythons, [(d, len(b)) for d, b in sources])
        deadline = time.monotonic() + provider.boot_timeout
        refused_since: float | None = None
        try:
            while True:
                if cancelled is not None and cancelled():
                    raise RemoteError(f"node{number} ({node.ip}): not bootstrapped, cancelled")
                try:
                    stdin = b"".join(b for _, b in sources) + json.dumps(conf).encode()
                    result = t.run(cmd, stdin=stdin, timeout=120)
                    break
                except RemoteError as e:
                    # a new instance: sshd not up yet, up before cloud-init installed the key,
                    # or dropping connections while it starts
                    now = time.monotonic()
                    refused = "authentication refused" in str(e)
                    if refused and refused_since is None:
                        refused_since = now
                    booting = isinstance(e, (UnreachableError, LostError)) or (
                        # the key lands seconds after sshd answers; a wrong user never does
                        refused and now - (refused_since or now) < AUTH_WINDOW
                    )
                    if not booting or now > deadline:
                        raise
                    pause(2)  # an interrupted `up` ends this wait at once
        finally:
            t.close()
        check(result, t, "bootstrapping the node")
        found = _markers(result.stdout)
        where = f"node{number} ({node.ip})"
        if not {"ssh", "root", "python"} <= found.keys():
            noise = next((x for x in result.stdout.splitlines() if x.strip()), "nothing")
            raise RemoteError(
                f"{where}: bootstrap output not understood (first line: {noise[:80]!r}); "
                "check that the login shell runs commands as given"
            )
        if not found["python"]:
            raise RemoteError(
                f"{where}: no Python with torch found (tried {', '.join(pythons)}); set "
                "ssh.python in the spec to the interpreter that has torch"
            )
        try:
            gpus = json.loads(found.get("gpus", ""))
        except ValueError:
            raise RemoteError(f"{where}: the GPU probe printed {found.get('gpus')!r}") from None
        seen_as = found["ssh"].split()
        # The address the node itself holds (the server side of SSH_CONNECTION) is the one its
        # peers reach for rendezvous; the provider's view can differ (NAT, proxies).
        private_ip = seen_as[2] if len(seen_as) == 4 else node.private_ip
        return state.NodeRecord(
            i,
            node.node_id,
            node.ip,
            private_ip,
            found["root"],
            gpus["count"],
            gpus["model"],
            node.status,
            found["python"],
        )

    return fan_out(one, list(range(len(nodes))))


def _bootstrap_script(
    root_path: str, pythons: tuple[str, ...], files: list[tuple[str, int]]
) -> str:
    """The one command bootstrap runs; stdin holds the files (path under the root, size), in
    order, then the agent's config. It reports in MARK lines."""
    root = path_arg(root_path)
    agent_dir = f"{root}/{shell.DIR}"
    # torch is looked up, not imported: an import takes seconds, and on a fresh cloud volume
    # (blocks fetched lazily from a snapshot) tens of seconds per interpreter tried
    has_torch = quote("import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)")
    return (
        f"umask 077 && mkdir -p {root}/bin {root}/jobs {root}/workdir {agent_dir} "
        f"&& chmod 700 {root} "
        + "".join(f"&& head -c {size} > {root}/{quote(dest)} " for dest, size in files)
        + f"&& cat > {agent_dir}/config.json && cd {root} || exit 1\n"
        f'echo "{MARK}ssh=${{SSH_CONNECTION:-}}"\n'
        f'echo "{MARK}root=$(pwd -P)"\n'
        f"for c in {' '.join(quote(p) for p in pythons)}; do\n"
        f'  p=$(command -v "$c") || continue\n'
        f'  "$p" -c {has_torch} </dev/null >/dev/null 2>&1 || continue\n'
        f'  echo "{MARK}python=$p"\n'
        f'  g=$("$p" {shell.STDLIB_PY} {CTL} gpus) || exit 1\n'
        f'  echo "{MARK}gpus=$g"\n'
        f'  echo "{MARK}agent=$("$p" {shell.AGENT} start "$(pwd -P)")"\n'
        f"  exit 0\n"
        f"done\n"
        f'echo "{MARK}python="\n'
    )


def _markers(stdout: str) -> dict[str, str]:
    """KEY=VALUE from the lines that start with MARK (the last one of a key wins)."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith(MARK):
            key, _, value = line[len(MARK) :].partition("=")
            found[key] = value.strip()
    return found


METADATA = {"aws": "http://169.254.169.254", "gce": "http://metadata.google.internal"}


def metadata_endpoints() -> dict[str, str]:
    """Where the agents ask their cloud's metadata server. MLCLOUD_METADATA_AWS/_GCE replace
    the real ones (a local stand-in: emulated clouds, whose nodes are not cloud machines)."""
    return {k: os.environ.get(f"MLCLOUD_METADATA_{k.upper()}", v) for k, v in METADATA.items()}


def deadline(max_cost: float | None, per_hour: float, start: float) -> float | None:
    """Unix time at which max_cost is spent at per_hour (the whole cluster's $/h); None when
    there is no budget or nothing is billed."""
    if max_cost is None or per_hour <= 0:
        return None
    return start + max_cost / per_hour * 3600


def budget_deadline(
    max_cost: float | None, billing: list[Interval], now: float, joining: float = 0.0
) -> float | None:
    """When what is left of max_cost is spent at the rate of the nodes billing now, plus
    `joining` $/h for nodes about to join; None when there is no budget or no rate."""
    if max_cost is None:
        return None
    return deadline(max(max_cost - accrued(billing, now), 0.0), hourly(billing) + joining, now)


def set_deadline(t: Transport, root: str, due: float | None) -> None:
    """Give a node's agent a new budget deadline (it re-reads config.json every poll).
    Raises RemoteError when the node cannot be asked or has no agent config."""
    path = f"{root}/{DIR}/config.json"
    raw = t.get(path)
    if raw is None:
        raise RemoteError(f"{t.label}: no agent config at {path}")
    conf = json.loads(raw)
    conf["deadline"] = due
    t.put(json.dumps(conf).encode(), path, mode=0o600)


def config(
    auto: AutoscaleSpec,
    provider: str,
    uid: str,
    node: int,
    node_id: str,
    spot: bool,
    due: float | None,
    owns_machines: bool = False,
) -> dict[str, object]:
    """config.json for one node's agent (it re-reads it every poll). node is the node's
    number (the K of its `node-K` directory, fixed when it was made), which the agent names
    the node by and its processes are tagged by; node_id lets a cloud node's agent make sure
    the metadata server describes this very instance before it powers anything off; spot
    turns on the polling of preemption notices; owns_machines (the provider's capability)
    says whether stopping the node powers it off."""
    return {
        "poll_seconds": auto.poll_seconds,
        "idle_minutes": auto.idle_minutes,
        "idle_util_percent": auto.idle_util_percent,
        "stall_minutes": auto.stall_minutes,
        "on_stall": auto.on_stall,
        "heartbeat_minutes": auto.heartbeat_minutes,
        "deadline": due,
        "provider": provider,
        "node": node,
        "tag": tag(uid, node),
        "metadata": metadata_endpoints(),
        "node_id": node_id,
        "spot": spot,
        "owns_machines": owns_machines,
    }
