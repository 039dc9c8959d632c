"""Jobs on a cluster: launch, follow to the end (driver, outcome), reconcile with the nodes,
cancel, and pull the outputs home."""
