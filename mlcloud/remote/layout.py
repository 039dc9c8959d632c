"""Where mlcloud keeps things on a node, and how it marks a node's processes: shared by the
engine, which starts jobs, and the providers, which must find and stop them at teardown."""

CTL = "bin/node_ctl.py"  # the node controller, relative to a node's root


def tag(uid: str, node: int, job_id: int | None = None) -> str:
    """The MLCLOUD_PROC_TAG value of a job's processes on a node, or (no job) the prefix that
    matches every process the cluster started there."""
    return f"{uid}.{node}." + ("" if job_id is None else f"{job_id}.")
