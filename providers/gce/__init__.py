"""The Google Compute Engine provider: `provider` (the contract), `api` (the SDK, lazily),
`rules` (what GCE accepts, pure), `billing` (prices for `catalog refresh`)."""

from mlcloud.providers.gce.provider import GceProvider

__all__ = ["GceProvider"]
