"""`status NAME` on machines mlcloud owns (a cloud's): a node whose agent powered it off can no
longer be asked why, so the cloud's listing says it is terminated. The local provider stands in
for the cloud, its nodes made silent as a powered-off instance is."""

from __future__ import annotations

from mlcloud.providers.base import Capabilities
from mlcloud.providers.local import LocalProvider
from mlcloud.templates import node_ctl

from mlcloud import state
from mlcloud.control import agentview, nodeevents
from mlcloud.provision import handle, lifecycle
from mlcloud.remote.transport import RemoteError
from mlcloud.report import PlainReporter
from mlcloud.spec.task import TaskSpec

QUIET = PlainReporter(quiet=True)


class _Owned(LocalProvider):
    capabilities = Capabilities(owns_machines=True)


def test_a_silent_node_its_cloud_lists_as_gone_is_terminated(monkeypatch):
    owned = _Owned()
    monkeypatch.setattr("mlcloud.providers.get", lambda name: owned)
    store = state.open_store()
    lifecycle.up(store, "ec2", TaskSpec(provider="local", nodes=2), QUIET, price=1.0)
    h = handle.open_cluster(store, "ec2")
    # shutdown -h now: the machine is gone, its agent with it (an agent left running could
    # write into the directory while it is removed, and keep it listed)
    node_ctl.stop_agent(h.nodes[0].root)
    owned.terminate(h.ref, [handle.provider_node(h.nodes[0])])
    h.close()

    def silent(t, root, node, samples=0, timeout=10.0):
        raise RemoteError(f"{t.label}: no answer")

    monkeypatch.setattr(agentview, "read", silent)
    rec = store.get_cluster("ec2")
    assert set(nodeevents.refresh(store, rec)) == {0}  # node1 is silent but listed: left as is
    rec = store.get_cluster("ec2")
    assert [n.status for n in rec.nodes] == ["terminated", "running"]
    why = nodeevents.stop_reasons(nodeevents.log(store, rec))
    assert "provider lists it as missing" in why[0] and 1 not in why
    billing = [i for i in store.billing("ec2") if i.uid == rec.uid]
    assert [i.end is None for i in billing] == [False, True]  # node0 bills no more
    assert nodeevents.refresh(store, rec) == {}  # asked once: no second event
    assert sum(e.kind == "terminated" for e in nodeevents.log(store, rec)) == 1
    # down leaves an owned machine's processes to its cloud: end node1's agent as one would
    node_ctl.stop_agent(rec.nodes[1].root)
    lifecycle.down(store, "ec2", QUIET)
    assert owned.list(h.ref) == []
