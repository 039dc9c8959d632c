"""`init`: scaffold a project from a template."""

from __future__ import annotations

from pathlib import Path

import typer


def init(
    directory: Path = typer.Argument(
        Path("."), help="Where to write the project.", file_okay=False
    ),
    template: str = typer.Option("ddp", "--template", "-t", help="Template to start from."),
) -> None:
    """Write a runnable project (training script + mlcloud.yaml); never overwrites a file."""
    import shutil

    from mlcloud import templates
    from mlcloud.errors import MlcloudError, UsageError

    source = templates.path(template)
    available = sorted(
        p.name for p in templates.ROOT.iterdir() if p.is_dir() and (p / "mlcloud.yaml").exists()
    )
    if template not in available:
        raise UsageError(f"unknown template {template!r}; available: {', '.join(available)}")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in {".py", ".yaml"})
    clash = [directory / f.name for f in files if (directory / f.name).exists()]
    if clash:
        raise UsageError(f"{clash[0]} already exists; pick an empty directory (nothing written)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, directory / f.name)
    except OSError as e:
        where = e.filename or directory
        raise MlcloudError(f"cannot write the project to {where}: {e.strerror}") from None
    print(f"wrote {', '.join(f.name for f in files)} to {directory}")
    print(
        f"next: mlcloud up demo -f {directory / 'mlcloud.yaml'} && "
        f"mlcloud train demo -f {directory / 'mlcloud.yaml'}"
    )
