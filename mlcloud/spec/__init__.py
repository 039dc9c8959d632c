"""What the user asked for and what it costs: the task spec, cluster names, buckets, the GPU
catalog, placement by data locality, and the plan (offer, region, $/h) shown before spending."""
