"""Where mlcloud keeps its state: $MLCLOUD_HOME, else the platform's user data dir."""

import os
from pathlib import Path


def home() -> Path:
    """The state directory, created 0700 (it holds keys and logs)."""
    env = os.environ.get("MLCLOUD_HOME")
    if env:
        path = Path(env).expanduser()
    else:
        from platformdirs import user_data_dir

        path = Path(user_data_dir("mlcloud", appauthor=False))
    private_dir(path)
    return path


def private_dir(path: Path) -> Path:
    """Create a directory readable only by the user, tightening an existing one."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def logs_dir(cluster: str) -> Path:
    return private_dir(home() / "logs" / cluster)


def locks_dir() -> Path:
    return private_dir(home() / "locks")
