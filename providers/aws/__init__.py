"""The AWS provider: `provider` (the contract), `api` (boto3, lazily: calls, retries, errors),
`network` (key pair, security group, placement group), `images` (AMIs and login users),
`prices` (for `catalog refresh`), `iam` (the nodes' bucket credentials)."""
