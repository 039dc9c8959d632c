"""`events`, in-process (no nodes: the cluster is only a row): `--follow` prints every event
once; a torn-down cluster's events are still there."""

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
            store.event("fol", "scale_up", "one node more")
        else:  # torn down while followed: the loop ends
            store.delete_cluster("fol")

    monkeypatch.setattr(events_cli, "time", types.SimpleNamespace(sleep=sleep))
    r = CliRunner().invoke(app, ["events", "fol", "--follow", "--json"])
    assert r.exit_code == 0, r.output
    kinds = [json.loads(line)["kind"] for line in r.output.splitlines()]
    assert sorted(kinds) == ["deleted", "idle_teardown", "intent", "scale_up"], kinds


def test_a_torn_down_clusters_events_are_still_shown(mlcloud_home):
    """A budget stop on a cloud ends in `down`, which drops the cluster's row: its events, the
    reason included, must still be found by name."""
    from mlcloud.cli.app import app

    from mlcloud import state

    store = state.open_store()
    store.create_cluster("gone", "gone-1", "aws", {}, "me")
    store.event("gone", "budget_stop", "spent $1.00 of max_cost $1.00")
    store.delete_cluster("gone")
    for follow in ([], ["--follow"]):
        r = CliRunner().invoke(app, ["events", "gone", "--json", *follow])
        assert r.exit_code == 0, r.output
        text = r.output if follow else json.dumps(json.loads(r.output))
        assert "budget_stop" in text and "deleted" in text, r.output
    r = CliRunner().invoke(app, ["events", "never"])
    assert "no cluster named 'never'" in str(r.exception)
