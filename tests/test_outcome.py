"""How a job's end is told from its nodes' ends (pure: the driver and reconciliation share it)."""

from mlcloud.jobs.outcome import KILLED, LOST, NodeEnd, decide


def test_success():
    o = decide(3, {0: NodeEnd(0), 1: NodeEnd(0)}, [1, 0])
    assert (o.status, o.exit_code, o.line) == ("SUCCEEDED", 0, "job 3 succeeded on 2 node(s)")


def test_the_first_node_to_fail_gives_its_ranks_own_code():
    ends = {
        0: NodeEnd(1, {"rank": 0, "exit_code": 1, "signal": None}),
        1: NodeEnd(5, {"rank": 3, "exit_code": 5, "signal": None}),
    }
    o = decide(1, ends, [1, 0])
    assert (o.status, o.exit_code) == ("FAILED", 5)
    assert o.line == "job 1 failed: node1 rank 3: exited with 5; node0 rank 0: exited with 1"


def test_signals_killed_and_lost_nodes_are_named():
    ends = {
        0: NodeEnd(137, {"rank": 1, "exit_code": 137, "signal": "SIGKILL"}),
        1: NodeEnd(KILLED),
        2: NodeEnd(LOST),
        3: NodeEnd(143),
    }
    o = decide(2, ends, [0, 1, 2, 3])
    assert o.exit_code == 137
    assert o.line == (
        "job 2 failed: node0 rank 1: killed by SIGKILL (exit 137); "
        "node1: its processes were killed (exit 137); "
        "node2: lost contact (the node or its connection went away); "
        "node3: ended by signal 15 (exit 143)"
    )


def test_cancelled_wins_over_failed():
    o = decide(4, {0: NodeEnd(143, cancelled=True), 1: NodeEnd(0)}, [0, 1])
    assert (o.status, o.exit_code) == ("CANCELLED", 143)
    assert o.line.startswith("job 4 cancelled: node0: ended by signal 15")
