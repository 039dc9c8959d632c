"""Provider plugins. Built-ins load lazily; third parties register under the entry point group
`mlcloud.providers` (the built-ins are listed there too, so both go through one path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlcloud.errors import UsageError

if TYPE_CHECKING:
    from mlcloud.providers.base import Provider

DEFAULT = "local"
_BUILTIN = {
    "local": "mlcloud.providers.local:LocalProvider",
    "ssh": "mlcloud.providers.ssh:SshProvider",
    "aws": "mlcloud.providers.aws.provider:AwsProvider",
    "gce": "mlcloud.providers.gce.provider:GceProvider",
}


def names() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(set(_BUILTIN) | {ep.name for ep in entry_points(group="mlcloud.providers")})


def get(name: str | None) -> Provider:
    """Instantiate a provider by name, importing only its module."""
    name = name or DEFAULT
    target = _BUILTIN.get(name)
    if target is None:
        from importlib.metadata import entry_points

        found = [ep for ep in entry_points(group="mlcloud.providers") if ep.name == name]
        if not found:
            raise UsageError(f"unknown provider {name!r}; available: {', '.join(names())}")
        return found[0].load()()
    from importlib import import_module

    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)()
