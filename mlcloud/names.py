"""Cluster names become tags, labels, host names and paths: they follow the strictest rules."""

import re

from mlcloud.errors import UsageError

NAME_RULE = "a letter first, then lowercase letters, digits and hyphens, at most 40 characters"
_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,39}")


def check_cluster_name(name: str) -> str:
    """Return the name if valid, else raise a UsageError that states the rule."""
    if not _NAME_RE.fullmatch(name) or name.endswith("-"):
        raise UsageError(
            f"invalid cluster name {name!r}: use {NAME_RULE}, not ending in a hyphen "
            "(e.g. 'llm-train-2')"
        )
    return name
