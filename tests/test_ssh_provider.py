"""The ssh provider's host parsing: what `--hosts` accepts comes back out of a node id."""

from __future__ import annotations

import pytest
from mlcloud.providers.base import ClusterRef
from mlcloud.providers.ssh import SshProvider, parse_host

from mlcloud.errors import UsageError

REF = ClusterRef("lab", "lab-1", "me")


@pytest.mark.parametrize(
    "text, user, host, port",
    [
        ("alice@10.0.0.5:2222", "alice", "10.0.0.5", 2222),
        ("gpu-box", None, "gpu-box", None),
        ("bob@[::1]:22", "bob", "::1", 22),
        ("[fe80::1]", None, "fe80::1", None),
    ],
)
def test_hosts_round_trip_through_node_ids(text, user, host, port):
    h = parse_host(text)
    assert (h.user, h.host, h.port) == (user, host, port)
    node = SshProvider()._node(REF, 0, text)
    assert parse_host(node.node_id) == h and node.ip == host


@pytest.mark.parametrize("text", ["a@@h", "h:0", "h:70000", "h:port", "a b", "::1:22"])
def test_bad_hosts_say_the_form(text):
    with pytest.raises(UsageError, match=r"\[user@\]host\[:port\]"):
        parse_host(text)


def test_a_type_without_a_provider_asks_for_one():
    from mlcloud.spec import plan
    from mlcloud.spec.task import GpuSpec, Resources, TaskSpec

    spec = TaskSpec(resources=Resources(gpus=GpuSpec("A100", 8), instance_type="p4d.24xlarge"))
    with pytest.raises(UsageError, match="needs a provider: add --provider aws"):
        plan.make(spec, default_region=lambda p: None)
