"""`init`: scaffold a project from a template."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def _create(path: Path, data: bytes) -> None:
    """A new file only: O_EXCL|O_NOFOLLOW, as the workdir receiver writes (templates/receive.py),
    so a symlink standing there, dangling or not, is refused instead of written through."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def init(
    directory: Path = typer.Argument(
        Path("."), help="Where to write the project.", file_okay=False
    ),
    template: str = typer.Option("ddp", "--template", "-t", help="Template to start from."),
) -> None:
    """Write a runnable project (training script + mlcloud.yaml); never overwrites a file."""
    from mlcloud import templates
    from mlcloud.errors import MlcloudError, UsageError

    source = templates.path(template)
    available = sorted(
        p.name for p in templates.ROOT.iterdir() if p.is_dir() and (p / "mlcloud.yaml").exists()
    )
    if template not in available:
        raise UsageError(f"unknown template {template!r}; available: {', '.join(available)}")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in {".py", ".yaml"})
    # lexists: a dangling symlink is in the way too, never written through
    clash = [directory / f.name for f in files if os.path.lexists(directory / f.name)]
    if clash:
        raise UsageError(f"{clash[0]} already exists; pick an empty directory (nothing written)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for f in files:
            _create(directory / f.name, f.read_bytes())
    except FileExistsError as e:  # made (a file, a symlink) since the check above
        raise UsageError(
            f"{e.filename} already exists; pick an empty directory (nothing overwritten)"
        ) from None
    except OSError as e:
        where = e.filename or directory
        raise MlcloudError(f"cannot write the project to {where}: {e.strerror}") from None
    print(f"wrote {', '.join(f.name for f in files)} to {directory}")
    print(
        f"next: mlcloud up demo -f {directory / 'mlcloud.yaml'} && "
        f"mlcloud train demo -f {directory / 'mlcloud.yaml'}"
    )
