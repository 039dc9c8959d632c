"""Stand-ins for cloud APIs that run on loopback, driven by the real client libraries."""
