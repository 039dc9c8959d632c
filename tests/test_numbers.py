"""Every number a person gives (a flag, a spec key, an environment variable) is a finite number
in its range, or one `error:` line and exit 2: nan, inf, a 400-digit number, a negative, zero
where it means nothing, and YAML 1.1's `1e-9` (text to it). One check (mlcloud/numbers.py)."""

from __future__ import annotations

import pytest
from conftest import run_cli_in_process

HUGE = "9" * 400

FLAGS = [
    (["autoscale", "x", "--interval", "nan"], "--interval: nan is not a finite number"),
    (["autoscale", "x", "--interval", "inf"], "--interval: inf is not a finite number"),
    (["autoscale", "x", "--interval", "0"], "--interval: 0 is out of range"),
    (["autoscale", "x", "--interval", HUGE], "--interval: inf is not a finite number"),
    (["events", "x", "--follow", "--interval", "inf"], "--interval: inf is not"),
    (["events", "x", "--interval", "-1"], "--interval: -1 is out of range"),
    (["pull", "x", "--max-size", HUGE], "--max-size: '99999"),
    (["pull", "x", "--max-size", "0"], "--max-size: '0' is not a size"),
    (["pull", "x", "--job", HUGE], "--job: a 400-digit number is out of range"),
    (["pull", "x", "--node", "-1"], "--node: -1 is out of range"),
    (["logs", "x", "--job", "-1"], "--job: -1 is out of range"),
    (["cancel", "x", "--grace", "1e400"], "--grace: inf is not a finite number"),
    (["cancel", "x", "--grace", "-2"], "--grace: -2 is out of range"),
    (["ssh", "x", "--node", HUGE], "--node: a 400-digit number is out of range"),
    (["train", "x", "t.py", "--nproc-per-node", HUGE], "--nproc-per-node: a 400-digit"),
    (["up", "x", "--ssh-port", "70000"], "--ssh-port: 70000 is out of range"),
    (["up", "x", "--max-hours", "0"], "--max-hours: 0 is out of range"),
    (["up", "x", "--max-hours", HUGE], "--max-hours: inf is not a finite number"),
    (["gc", "--min-age", "-1"], "--min-age: -1 is out of range"),
    (["doctor", "--timeout", "nan"], "--timeout: nan is not a finite number"),
    (["offers", "A100:8", "--max-price", "inf"], "--max-price: inf is not a finite number"),
]


def one_line(r, words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert words in lines[0] and "Traceback" not in r.stderr, lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, words", FLAGS, ids=[" ".join(a[:2] + a[-2:])[:60] for a, _ in FLAGS]
)
def test_number_flags_refuse_what_is_not_a_finite_number_in_range(mlcloud_home, args, words):
    one_line(run_cli_in_process(*args), words)
    assert not (mlcloud_home / "local").exists()  # nothing made


SPEC = [
    ("autoscale:\n  poll_seconds: 1e-9\n", "got the text '1e-9' (YAML 1.1 reads"),
    ("autoscale:\n  poll_seconds: 1.0e-9\n", "poll_seconds: 1e-09 is out of range"),
    ("autoscale:\n  idle_minutes: .inf\n", "idle_minutes: inf is not a finite number"),
    ("autoscale:\n  max_cost: .nan\n", "max_cost: nan is not a finite number"),
    (f"autoscale:\n  stall_minutes: {HUGE}\n", "stall_minutes: a 400-digit number"),
    (f"nodes: {HUGE}\n", "nodes: must be a whole number of 1 or more (up to 10,000)"),
    (f"max_workdir_size: {HUGE}\n", "max_workdir_size: 999"),
    (f"max_workdir_files: {HUGE}\n", "max_workdir_files: a 400-digit number"),
    (
        "spot_max_price: 1e3\n",
        "spot_max_price: must be a number above 0 and 1,000,000 or less, got the text '1e3'",
    ),
    (f"resources:\n  gpus: 'A100:{HUGE}'\n", "the count must be 1 or more (up to 1024)"),
]


@pytest.mark.parametrize("text, words", SPEC, ids=[s[1].split(":")[0] for s in SPEC])
def test_spec_numbers_refuse_the_same_way(mlcloud_home, tmp_path, text, words):
    spec = tmp_path / "mlcloud.yaml"
    spec.write_text(text)
    line = one_line(run_cli_in_process("up", "x", "-f", str(spec), "--yes"), words)
    assert f"{spec}:" in line
    if "the text" in words:
        assert "write 1.0e" in line


@pytest.mark.parametrize("value", ["nan", "inf", HUGE, "-5", "0"])
def test_waits_from_the_environment_refuse_the_same_way(mlcloud_home, monkeypatch, value):
    monkeypatch.setenv("MLCLOUD_FAIL_GRACE", value)
    one_line(run_cli_in_process("status"), "MLCLOUD_FAIL_GRACE=")
