"""The CLI's contract where commands share it, in-process (the console script's own exit code
is tests/test_cli_errors.py's): one letter means one option everywhere; `down` of a name state
does not know is `not_found`, after the known ones went down."""

from __future__ import annotations

import json

import typer
from mlcloud.cli.app import app, run

from mlcloud import state

PAIRS = {"-f": "--file", "-F": "--follow", "-y": "--yes"}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one command through the CLI's one exit point."""
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _options(command, path=("mlcloud",)):
    """(command path, option names) of every option of every command and subcommand."""
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _options(sub, (*path, name))
    for p in command.params:
        if p.param_type_name == "option":
            yield " ".join(path), set(p.opts) | set(p.secondary_opts)


def test_short_options_mean_the_same_everywhere():
    seen = list(_options(typer.main.get_command(app)))
    assert any("-F" in opts for _, opts in seen)  # the walk reaches the commands' options
    for where, opts in seen:
        for short, long in PAIRS.items():
            assert (short in opts) == (long in opts), f"{where}: {sorted(opts)}"


def test_down_of_an_unknown_cluster_is_not_found(capsys):
    code, out, err = cli(capsys, "down", "typo", "--yes", "--json")
    assert code == 1 and err == "error: no cluster named 'typo'; `mlcloud status` lists them all\n"
    assert json.loads(out)["error"]["kind"] == "not_found"
    code, out, err = cli(capsys, "down", "typo")  # no question asked first: nothing to ask
    assert code == 1 and err.count("\n") == 1 and "'typo'" in err and out == ""
    assert cli(capsys, "down", "--all") == (0, "no clusters to tear down\n", "")


def test_down_takes_the_known_ones_down_and_names_the_unknown(capsys):
    store = state.open_store()
    for name in ("one", "two"):  # rows only: no node to terminate
        store.create_cluster(name, f"{name}-1", "local", {}, "me")
    code, out, err = cli(capsys, "down", "one", "typo", "--yes")
    assert code == 1 and err.splitlines()[-1].startswith("error: no cluster named 'typo'")
    code, out, err = cli(capsys, "down", "two", "typo", "other", "--yes", "--json")
    assert code == 1 and "'typo', 'other'" in err.splitlines()[-1]
    assert [(c["name"], c["status"]) for c in json.loads(out)["clusters"]] == [
        ("two", "down"),
        ("typo", "not_found"),
        ("other", "not_found"),
    ]
    assert store.list_clusters() == []


def test_a_question_goes_to_stderr_so_stdout_stays_json(monkeypatch, capsys):
    """`down --json` or `gc --json` on a terminal: the question must not precede the JSON."""
    import io

    from mlcloud.cli import output

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    output.confirm("tear down demo?", yes=False)
    out, err = capsys.readouterr()
    assert out == "" and "tear down demo?" in err
