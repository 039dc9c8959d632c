"""The Google Compute Engine provider: `provider` (the contract), `api` (the SDK, lazily),
`rules` (what GCE accepts, pure), `billing` (prices for `catalog refresh`)."""
