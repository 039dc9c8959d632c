"""Errors meant for a person: one line saying what, where, and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
Every command exits with the same codes (README, "Exit codes"): 0 ok, 1 the job or the
command failed, 2 bad input, 3 no capacity anywhere tried, 4 quota, 5 credentials or auth,
130 interrupted. `train` and `logs --follow` exit with the job's own code.
"""

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CAPACITY = 3
EXIT_QUOTA = 4
EXIT_AUTH = 5
EXIT_INTERRUPTED = 130


class MlcloudError(Exception):
    """A failure the user can act on; exits 1."""

    exit_code = EXIT_FAILED


class UsageError(MlcloudError):
    """Bad input on the command line or in a spec file; exits 2 like click's usage errors."""

    exit_code = EXIT_USAGE


class Aborted(MlcloudError):
    """The person declined a prompt: not bad input, nothing was changed; exits 1 with the one
    word "aborted", as other CLIs do."""

    def __init__(self) -> None:
        super().__init__("aborted")


class NotFoundError(MlcloudError):
    """A named cluster or job does not exist."""


class StoreUnavailable(MlcloudError):
    """The shared state database cannot be reached or answer in time (kind `environment`)."""


class BusyError(MlcloudError):
    """Another mlcloud command holds the cluster (or the state database) for too long."""


class LocalWriteError(MlcloudError):
    """This machine's file system refused a write (read-only, full, something in the way)."""
