"""Elastic control: the node agents' view, the pure policy, and the controller that gathers,
decides and applies."""
