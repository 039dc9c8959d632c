"""Elastic control: the pure policy and the controller that gathers, decides and applies."""
