"""Any exception that ends a command, as one line for a person (and an object for --json).

Users' errors say what and how to fix; a cloud SDK's unclassified error names the provider and
the operation; a genuine bug leaves its traceback in a file whose path the line gives. Nothing
heavy is imported here: SDK errors are recognised by the module their class comes from.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

from mlcloud import __version__
from mlcloud.errors import (
    EXIT_AUTH,
    EXIT_CAPACITY,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_QUOTA,
    EXIT_USAGE,
    Aborted,
    BusyError,
    LocalWriteError,
    MlcloudError,
    NotFoundError,
    StoreUnavailable,
    UsageError,
)

# class module prefix -> the provider whose SDK raised it
_SDKS = {
    "botocore": "aws",
    "boto3": "aws",
    "google.api_core": "gce",
    "google.auth": "gce",
    "paramiko": "ssh",
}

_ENVIRONMENT = {
    errno.EACCES: "check its permissions; MLCLOUD_HOME must be a directory you can write",
    errno.EPERM: "check its permissions; MLCLOUD_HOME must be a directory you can write",
    errno.EROFS: "the filesystem is read-only; set MLCLOUD_HOME to a writable directory",
    errno.ENOSPC: "the disk is full: free some space and retry",
    errno.EDQUOT: "the disk quota is used up: free some space and retry",
    errno.ENOTDIR: "a file stands where a directory should be: move it aside",
    errno.EISDIR: "a directory stands where a file should be: move it aside",
    errno.EEXIST: "something is in the way: move it aside",
    errno.ENAMETOOLONG: "a name is too long for that file system: shorten it",
    errno.EFBIG: "a file is too large for that file system",
    errno.EIO: "the disk reported an I/O error: check it",
}


# The click that Typer runs on: its own trimmed copy since typer 0.28, else click itself.
try:
    from typer._click import exceptions
except ImportError:  # typer < 0.28
    from click import exceptions


@dataclass(frozen=True)
class Failure:
    kind: str  # stable, for --json: usage, not_found, busy, capacity, quota, auth, ...
    message: str  # one line, without the "error: " prefix
    exit_code: int

    def json(self) -> dict:
        return {"error": {"kind": self.kind, "message": self.message, "exit_code": self.exit_code}}


def describe(e: BaseException) -> Failure:
    """The one line (and exit code) for an exception that reached the top."""
    import typer

    if isinstance(e, (KeyboardInterrupt, typer.Abort, EOFError)):
        return Failure("interrupted", "interrupted", EXIT_INTERRUPTED)
    if isinstance(e, MlcloudError):
        return Failure(_kind(e), _one_line(str(e)), e.exit_code)
    if isinstance(e, exceptions.UsageError):
        return Failure("usage", _usage(e), EXIT_USAGE)
    if isinstance(e, exceptions.ClickException):  # click's file errors: not bad input
        return Failure("failed", _one_line(e.format_message()), e.exit_code)
    provider = _sdk(e)
    if provider:
        return Failure("cloud", _sdk_line(provider, e), EXIT_FAILED)
    if isinstance(e, OSError) and e.errno in _ENVIRONMENT:
        # a path, never a descriptor's number (an fd's filename is its number)
        where = f"{e.filename}: " if isinstance(e.filename, (str, bytes)) and e.filename else ""
        what = (e.strerror or str(e)).lower()
        return Failure("environment", f"{where}{what}; {_ENVIRONMENT[e.errno]}", EXIT_FAILED)
    path = write_traceback(e)
    return Failure(
        "internal",
        f"internal error ({type(e).__name__}: {_one_line(str(e))[:200]}); this is a bug in "
        f"mlcloud, please report it with the traceback in {path}",
        EXIT_FAILED,
    )


def _kind(e: MlcloudError) -> str:
    """A fixed vocabulary (README, "Exit codes"), not class names, so scripts can rely on it."""
    for cls, kind in (
        (UsageError, "usage"),
        (NotFoundError, "not_found"),
        (BusyError, "busy"),
        (StoreUnavailable, "environment"),
        (Aborted, "aborted"),
        (LocalWriteError, "environment"),
    ):
        if isinstance(e, cls):
            return kind
    return {EXIT_CAPACITY: "capacity", EXIT_QUOTA: "quota", EXIT_AUTH: "auth"}.get(
        e.exit_code, "failed"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _usage(e: exceptions.UsageError) -> str:
    """`--nodes: 'x' is not a valid integer (see `mlcloud up --help`)`: the option named first,
    click's usage block left out."""
    param = getattr(e, "param", None)
    if isinstance(e, exceptions.MissingParameter) or param is None:
        text = e.format_message()
        text = text[:1].lower() + text[1:]
    elif param.param_type_name == "option":
        text = f"{param.opts[0]}: {e.message}"
    else:
        text = f"{param.human_readable_name.upper()}: {e.message}"
    where = e.ctx.command_path if e.ctx is not None else "mlcloud"
    return f"{_one_line(text).rstrip('.')} (see `{where} --help`)"


def _sdk(e: BaseException) -> str | None:
    module = type(e).__module__ or ""
    for prefix, provider in _SDKS.items():
        if module == prefix or module.startswith(prefix + "."):
            return provider
    return None


def _sdk_line(provider: str, e: BaseException) -> str:
    operation = getattr(e, "operation_name", None)
    response = getattr(e, "response", None)
    short = ""
    if isinstance(response, dict):
        err = response.get("Error") or {}
        short = " ".join(str(p) for p in (err.get("Code"), err.get("Message")) if p)
    short = _one_line(short or str(e) or type(e).__name__)[:300]
    what = f"{operation} failed" if operation else type(e).__name__
    return f"{provider}: {what}: {short} (--debug for details)"


def write_traceback(e: BaseException) -> str:
    """Write the traceback to $MLCLOUD_HOME/logs/crash-<time>-<pid>.txt (a temp dir when the
    home is unusable); return the path."""
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    text = f"mlcloud {__version__}, python {sys.version.split()[0]}\n\n{text}"
    for folder in (_home_logs, tempfile.gettempdir):
        try:
            path = os.path.join(folder(), name)
            # a fresh file, never a symlink planted at its name (the fallback is a shared /tmp)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(text)
            return path
        except (OSError, MlcloudError):
            continue
    return "(no writable place for it; rerun with --debug to see it)"


def _home_logs() -> str:
    from mlcloud.state import paths

    return str(paths.private_dir(paths.home() / "logs"))
