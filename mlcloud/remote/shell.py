"""Building remote shell commands: every interpolated value goes through here, quoted."""

import shlex


def path_arg(path: str) -> str:
    """Quote a node path for the shell, keeping a leading ~/ expandable to the node's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


quote = shlex.quote
