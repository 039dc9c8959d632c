"""Where mlcloud keeps its state: $MLCLOUD_HOME, else the platform's user data dir."""

import os
import secrets
from pathlib import Path

from mlcloud.errors import MlcloudError


def home_path() -> Path:
    """Where the state directory is, whether or not it exists or is usable (`doctor`)."""
    env = os.environ.get("MLCLOUD_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("mlcloud", appauthor=False))


def home() -> Path:
    """The state directory. Created 0700 when missing; an existing directory the user named
    (~, /tmp) is used as it is, never chmodded: what is secret in it (keys, ssh, locks, logs,
    state.db) lives in private subdirectories and 0600 files of its own. One that cannot be
    used (a file, not writable) is refused in one line naming it."""
    path = home_path()
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise MlcloudError(
                f"mlcloud's home {path} is not writable; fix its permissions or set "
                "MLCLOUD_HOME to a directory you can write"
            )
        return path
    if path.is_symlink() and not path.exists():
        raise MlcloudError(
            f"mlcloud's home {path} links to {os.readlink(path)}, which does not exist; "
            "create it or set MLCLOUD_HOME to a directory"
        )
    if path.exists() and not path.is_dir():  # a directory by now: made by another thread
        raise MlcloudError(
            f"mlcloud's home {path} is a file, not a directory; move it aside or set "
            "MLCLOUD_HOME to a directory"
        )
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise MlcloudError(
            f"cannot create mlcloud's home {path}: {e.strerror}; set MLCLOUD_HOME to a "
            "directory you can write"
        ) from e
    return path


def private_dir(path: Path) -> Path:
    """Create a directory readable only by the user, tightening an existing one. Missing
    parents are made private too (mkdir's parents=True would make them 0755, logs/ say)."""
    if not path.parent.exists():
        private_dir(path.parent)
    path.mkdir(exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def home_id() -> str:
    """This home's random id, made with the home and kept in `home/id`. Clusters are tagged
    with it (mlcloud-owner), so `gc` tells this home's orphans from other people's: two CI
    runners as the same OS user still have different homes."""
    f = home() / "id"
    try:
        text = f.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    new = secrets.token_hex(8)
    tmp = f.with_name(f"id.{os.getpid()}.tmp")
    with open(tmp, "w") as out:
        out.write(new + "\n")
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(tmp, f)  # first writer wins, atomically, even between processes
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return f.read_text().strip()


def logs_dir(cluster: str) -> Path:
    return private_dir(home() / "logs" / cluster)


def locks_dir() -> Path:
    return private_dir(home() / "locks")
