"""`events --follow` prints every event once, in-process (no nodes: the cluster is only a row)."""

from __future__ import annotations

import json
import time
import types

from typer.testing import CliRunner


def test_follow_prints_a_late_merged_older_event_once(mlcloud_home, monkeypatch):
    """A node's event reaches the local log late (merged at the next look) with its own, older
    time, so it sorts before events already printed: follow must print it, and nothing twice."""
    from mlcloud.cli import events as events_cli
    from mlcloud.cli.app import app

    from mlcloud import state

    store = state.open_store()
    store.create_cluster("fol", "fol-1", "local", {}, "me")
    t0 = time.time()
    looks = []

    def sleep(_s):
        looks.append(1)
        if len(looks) == 1:  # the agent's event, 5 s older than what was printed
            store.merge_events("fol", "fol-1", [(t0 - 5, "idle_teardown", 0, "idle for 1 min")])
            store.event("fol", "scale up", "one node more")
        else:  # torn down while followed: the loop ends
            store.delete_cluster("fol")

    monkeypatch.setattr(events_cli, "time", types.SimpleNamespace(sleep=sleep))
    r = CliRunner().invoke(app, ["events", "fol", "--follow", "--json"])
    assert r.exit_code == 0, r.output
    kinds = [json.loads(line)["kind"] for line in r.output.splitlines()]
    assert sorted(kinds) == ["idle_teardown", "intent", "scale up"], kinds
