"""Building remote shell commands: every interpolated value goes through here, quoted, so
no value (a path, a job's argv, an interpreter) can inject a command on a node. The only
module of the engine and the providers that may call shlex.quote or shlex.join
(tests/test_shell.py holds this)."""

import shlex


def path_arg(path: str) -> str:
    """Quote a node path for the shell, keeping a leading ~/ expandable to the node's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


quote = shlex.quote
join = shlex.join  # an argv as one shell line, every word quoted


CTL = "bin/node_ctl.py"  # the node controller, relative to a node's root
# How the node's own short-lived programs (node_ctl.py, fanout.py, send/receive), standard
# library only, are run: isolated (-I: no PYTHON* variables, no user site, not the working
# directory on sys.path) and without site-packages (-S). A node's site-packages and its .pth
# files (conda's, a Deep Learning image's) can neither break them nor slow every call: Python
# starts in a third of the time. torchrun (node_ctl.py torchrun), the job, the checkpoint
# uploader and the agent (the one that speaks to the cloud's metadata) get the full one.
STDLIB_PY = "-I -S"


def tag(uid: str, node: int, job_id: int | None = None) -> str:
    """The MLCLOUD_PROC_TAG value of a job's processes on a node, or (no job) the prefix that
    matches every process the cluster started there."""
    return f"{uid}.{node}." + ("" if job_id is None else f"{job_id}.")


def node_number(root: str) -> int | None:
    """K of a node root named `.../node-K`: processes are tagged by their node's directory,
    so a spare that replaced another node keeps its own number."""
    last = root.rstrip("/").rsplit("/", 1)[-1]
    k = last[len("node-") :]
    return int(k) if last.startswith("node-") and k.isdigit() else None


def stop_line(python: str, root: str, uid: str) -> str:
    """The shell line that ends every process the cluster started on a node, its agent
    included; the node's directory stays. Run it with `stop_input()` as its stdin: where
    node_ctl is gone with the directory (a local node's removed: lost), that copy of node_ctl
    does it, so nothing of a lost node runs on beside its replacement."""
    number = node_number(root)
    if number is None:
        raise ValueError(f"not a node root: {root}")
    ctl = f"{path_arg(root)}/{CTL}"
    args = f"cleanup {path_arg(root)} {quote(tag(uid, number))}"
    py = f"{quote(python)} {STDLIB_PY}"
    return f"if [ -f {ctl} ]; then {py} {ctl} {args}; else {py} - {args}; fi"


def stop_input() -> bytes:
    """stop_line's stdin: node_ctl's source, for a node whose own copy is gone."""
    from mlcloud import templates

    return templates.path("node_ctl.py").read_bytes()


AGENT = "bin/agent.py"  # relative to a node's root, beside node_ctl.py
DIR = "agent"  # the agent's files, relative to a node's root
