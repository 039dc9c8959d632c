"""Errors meant for a person: one line saying what, where, and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class MlcloudError(Exception):
    """A failure the user can act on; exits 1."""

    exit_code = 1


class UsageError(MlcloudError):
    """Bad input on the command line or in a spec file; exits 2 like click's usage errors."""

    exit_code = 2


class NotFoundError(MlcloudError):
    """A named cluster or job does not exist."""


class BusyError(MlcloudError):
    """Another mlcloud command holds the cluster (or the state database) for too long."""

    exit_code = 3
