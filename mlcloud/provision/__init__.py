"""Provisioning: open a cluster from state, bring nodes up (create, bootstrap), tear them down,
and find or repair what state lost (gc, doctor)."""
