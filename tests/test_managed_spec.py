"""`recover:` in the spec (issue 20): the managed job's ladder limits and placements load into
RecoverSpec, survive the trip through state, and every bad value is one line naming the file,
line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlcloud.errors import UsageError
from mlcloud.spec.task import RecoverSpec, TaskSpec, load_spec


def _spec(tmp_path: Path, text: str) -> TaskSpec:
    path = tmp_path / "mlcloud.yaml"
    path.write_text(text)
    return load_spec(path)


def test_defaults_and_a_full_section_round_trip(tmp_path):
    assert _spec(tmp_path, "name: a\n").recover == RecoverSpec()
    spec = _spec(
        tmp_path,
        "recover:\n  max_restarts: 3\n  max_restarts_in_place: 0\n"
        "  placements: [aws, 'aws:us-east-1', 'aws:us-east-1a', 'gce:europe-west4', aws]\n"
        "  move_savings: off\n  on_failure: restart\n",
    )
    assert spec.recover == RecoverSpec(
        max_restarts=3,
        max_restarts_in_place=0,
        placements=("aws", "aws:us-east-1", "aws:us-east-1a", "gce:europe-west4"),
        move_savings=None,
        on_failure="restart",
    )
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    assert _spec(tmp_path, "recover:\n  move_savings: 0.5\n").recover.move_savings == 0.5
    assert _spec(tmp_path, "recover:\n  placements: gce\n").recover.placements == ("gce",)


BAD = [
    ("recover: 3", 1, "recover", "must be a mapping"),
    ("recover:\n  max_restart: 3", 2, "recover.max_restart", "unknown field"),
    ("recover:\n  max_restarts: -1", 2, "recover.max_restarts", "out of range"),
    ("recover:\n  max_restarts: 1.5", 2, "recover.max_restarts", "not a whole number"),
    ("recover:\n  max_restarts_in_place: x", 2, "recover.max_restarts_in_place", "whole number"),
    ("recover:\n  placements: []", 2, "recover.placements", "empty list"),
    ("recover:\n  placements: {aws: 1}", 2, "recover.placements", "must be a list"),
    ("recover:\n  placements: ['AWS']", 2, "recover.placements", "is not CLOUD"),
    ("recover:\n  placements: ['aws:us east']", 2, "recover.placements", "is not CLOUD"),
    ("recover:\n  placements: ['aws::a']", 2, "recover.placements", "is not CLOUD"),
    ("recover:\n  placements: [3]", 2, "recover.placements", "is not CLOUD"),
    ("recover:\n  move_savings: 0", 2, "recover.move_savings", "out of range"),
    ("recover:\n  move_savings: 2", 2, "recover.move_savings", "out of range"),
    ("recover:\n  move_savings: never", 2, "recover.move_savings", "must be"),
    ("recover:\n  on_failure: retry", 2, "recover.on_failure", "stop, restart"),
]


@pytest.mark.parametrize(
    "text, line, field, words", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)]
)
def test_bad_values_name_file_line_and_field(tmp_path, text, line, field, words):
    with pytest.raises(UsageError) as e:
        _spec(tmp_path, text + "\n")
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'mlcloud.yaml'}:{line}: {field}"), message
    assert words in message and "\n" not in message
