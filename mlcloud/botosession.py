"""boto3 sessions that share one model loader per process.

A new boto3 session reads and parses botocore's service models again (EC2's is megabytes of
JSON): ~0.25 s of CPU before its first client, where a session beside one that loaded them
takes ~0.015 s. mlcloud makes several in one command (the provider's, the bucket's region,
a checkpoint copy). Only the loader, whose models are static data, is shared; credentials,
region and configuration stay each session's own, read from the environment as it is then.
"""

from __future__ import annotations

import threading
from typing import Any

_loader: Any = None
_lock = threading.Lock()


def session() -> Any:
    """A new boto3 Session (boto3 imported here: the CLI starts without it)."""
    import boto3
    import botocore.session

    global _loader
    core = botocore.session.Session()
    with _lock:
        if _loader is None:
            _loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core)
