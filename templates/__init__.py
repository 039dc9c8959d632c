"""Files mlcloud ships to nodes and projects: the node controller and training templates."""

from pathlib import Path

ROOT = Path(__file__).parent


def path(name: str) -> Path:
    return ROOT / name
