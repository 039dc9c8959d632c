"""The task spec (`mlcloud.yaml`): valid files load into the dataclasses, bad ones are refused
with one line that names the file, the line of the key and the field."""

from __future__ import annotations

import json
import string
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlcloud import templates
from mlcloud.errors import UsageError
from mlcloud.spec.task import (
    AutoscaleSpec,
    GceSpec,
    GpuSpec,
    Resources,
    TaskSpec,
    TrainSpec,
    check_cluster_name,
    load_spec,
    parse_env,
    parse_gpus,
)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLCLOUD_HOME", str(tmp_path / "home"))


def write(tmp_path: Path, text: str | bytes, name: str = "mlcloud.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(UsageError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert info.value.exit_code == 2
    return message


FULL = """\
# every field there is
name: llm-train-2
provider: local
nodes: 2
resources:
  gpus: A100:8
  cpus: 16
  instance_type: p4d.24xlarge
region: us-east-1
zone: us-east-1a
spot: true
workdir: proj
setup: pip install -r requirements.txt
train:
  script: train.py
  args: [--lr, 0.1, --epochs, 3, --fast, true]
  nproc_per_node: 4
envs:
  WANDB_MODE: offline
  SEED: 42
  DEBUG: false
checkpoint_dir: ckpt
autoscale:
  idle_minutes: 30
  max_cost: 12.5
gce:
  project: my-project
  api_endpoint: https://compute.example.internal
"""


def full_expected(tmp_path: Path) -> TaskSpec:
    return TaskSpec(
        name="llm-train-2",
        provider="local",
        nodes=2,
        resources=Resources(gpus=GpuSpec("A100", 8), cpus=16, instance_type="p4d.24xlarge"),
        region="us-east-1",
        zone="us-east-1a",
        spot=True,
        workdir=str((tmp_path / "proj").resolve()),
        setup="pip install -r requirements.txt",
        train=TrainSpec(
            script="train.py",
            args=("--lr", "0.1", "--epochs", "3", "--fast", "true"),
            nproc_per_node=4,
        ),
        envs={"WANDB_MODE": "offline", "SEED": "42", "DEBUG": "false"},
        checkpoint_dir="ckpt",
        autoscale=AutoscaleSpec(idle_minutes=30.0, max_cost=12.5),
        gce=GceSpec(project="my-project", api_endpoint="https://compute.example.internal"),
    )


# --- valid specs ---------------------------------------------------------------------------


def test_full_spec_loads_every_field(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # workdir is relative to the file, not to the cwd
    spec = load_spec(write(tmp_path, FULL))
    assert spec == full_expected(tmp_path)
    assert isinstance(spec.train.args, tuple)
    assert isinstance(spec.autoscale.idle_minutes, float)


@pytest.mark.parametrize(
    "text",
    ["", "\n", "# nothing but a comment\n", "---\n", "~\n", "{}\n"],
    ids=["empty", "newline", "comment", "doc-start", "null", "empty-mapping"],
)
def test_empty_file_gives_defaults(tmp_path, text):
    spec = load_spec(write(tmp_path, text))
    assert spec == TaskSpec()
    assert spec.node_count == 1 and spec.nodes is None and spec.spot is False and spec.envs == {}
    assert spec.resources == Resources() and spec.train == TrainSpec()


@pytest.mark.parametrize(
    "text, field, expected",
    [
        ("nodes: 3\n", "nodes", 3),
        ("spot: false\n", "spot", False),
        ("spot: null\n", "spot", False),
        ("envs: null\n", "envs", {}),
        ("envs: {}\n", "envs", {}),
        ("envs:\n  A: ''\n", "envs", {"A": ""}),
        ("envs:\n  _X1: 1.5\n", "envs", {"_X1": "1.5"}),
        ("resources: null\n", "resources", Resources()),
        ("resources:\n  gpus: H100\n", "resources", Resources(gpus=GpuSpec("H100", 1))),
        ("resources:\n  gpus: L4:1\n", "resources", Resources(gpus=GpuSpec("L4", 1))),
        (
            "resources:\n  gpus: 'A100-80GB:8'\n",
            "resources",
            Resources(gpus=GpuSpec("A100-80GB", 8)),
        ),
        ("train:\n  args: null\n", "train", TrainSpec()),
        ("train:\n  args: []\n", "train", TrainSpec()),
        (
            "train:\n  args: \"--lr 0.1 --name 'a b'\"\n",
            "train",
            TrainSpec(args=("--lr", "0.1", "--name", "a b")),
        ),
        ("autoscale:\n  idle_minutes: 0.5\n", "autoscale", AutoscaleSpec(idle_minutes=0.5)),
        ("autoscale:\n  max_cost: 3\n", "autoscale", AutoscaleSpec(max_cost=3.0)),
        ("autoscale: null\n", "autoscale", AutoscaleSpec()),
        (
            "autoscale:\n  idle_util_percent: 10\n  stall_minutes: 0.25\n  on_stall: stop\n"
            "  heartbeat_minutes: 2\n  replace_lost: false\n  poll_seconds: 1\n",
            "autoscale",
            AutoscaleSpec(
                idle_util_percent=10.0,
                stall_minutes=0.25,
                on_stall="stop",
                heartbeat_minutes=2.0,
                replace_lost=False,
                poll_seconds=1.0,
            ),
        ),
        ("workdir: /abs/dir\n", "workdir", "/abs/dir"),
        ("name: a\n", "name", "a"),
        (f"name: {'a' * 40}\n", "name", "a" * 40),
    ],
)
def test_valid_fields(tmp_path, text, field, expected):
    assert getattr(load_spec(write(tmp_path, text)), field) == expected


def test_workdir_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    spec = load_spec(write(tmp_path, "workdir: ~/proj\n"))
    assert spec.workdir == str((tmp_path / "me" / "proj").resolve())


def test_workdir_unknown_user_is_a_plain_path(tmp_path):
    spec = load_spec(write(tmp_path, "workdir: ~nosuchuser0/x\n"))
    assert spec.workdir == str((tmp_path / "~nosuchuser0" / "x").resolve())


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="3.13 resolves loops without error")
def test_workdir_symlink_loop(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    path = write(tmp_path, "name: ok\nworkdir: loop/x\n")
    assert refusal(path).startswith(f"{path}:2: workdir: cannot resolve")


def test_template_spec_is_valid(tmp_path):
    """`mlcloud init` scaffolds this file: it must load."""
    spec = load_spec(templates.path("ddp") / "mlcloud.yaml")
    assert spec.name and spec.train.script == "train.py"
    assert spec.workdir == str(templates.path("ddp").resolve())


# --- to_dict / from_dict ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["full", "defaults", "gpus-only"])
def test_to_dict_from_dict_round_trip(tmp_path, which):
    spec = {
        "full": lambda: load_spec(write(tmp_path, FULL)),
        "defaults": TaskSpec,
        "gpus-only": lambda: TaskSpec(resources=Resources(gpus=GpuSpec("H100", 1))),
    }[which]()
    d = spec.to_dict()
    stored = json.loads(json.dumps(d))  # state keeps it as JSON
    assert stored == d
    assert TaskSpec.from_dict(stored) == spec
    assert TaskSpec.from_dict(stored).to_dict() == d


def test_to_dict_shape(tmp_path):
    d = load_spec(write(tmp_path, FULL)).to_dict()
    assert d["resources"]["gpus"] == "A100:8"
    assert d["train"]["args"] == ["--lr", "0.1", "--epochs", "3", "--fast", "true"]
    assert set(d) == {
        "name",
        "provider",
        "nodes",
        "resources",
        "region",
        "zone",
        "spot",
        "workdir",
        "max_workdir_files",
        "max_workdir_size",
        "setup",
        "train",
        "envs",
        "checkpoint_dir",
        "autoscale",
        "hosts",
        "ssh",
        "spot_max_price",
        "image",
        "gce",
        "storage",
        "recover",
    }


def test_from_dict_refuses_bad_data():
    with pytest.raises(UsageError, match="nodes"):
        TaskSpec.from_dict({"nodes": 0})


# --- bad specs, one by one -----------------------------------------------------------------

# (id, file text, field named in the message, line of the key, words the message must hold)
BAD = [
    ("unknown-top", "name: ok\nfoo: 1\n", "foo", 2, "unknown field"),
    ("unknown-resources", "resources:\n  gpus: A100:8\n  gpu: 1\n", "resources.gpu", 3, "unknown"),
    ("unknown-train", "train:\n  script: a.py\n  nprocs: 2\n", "train.nprocs", 3, "unknown"),
    ("unknown-autoscale", "autoscale:\n  idle: 5\n", "autoscale.idle", 2, "unknown"),
    ("on-stall-word", "autoscale:\n  on_stall: kill\n", "autoscale.on_stall", 2, "report, stop"),
    (
        "idle-util-over-100",
        "autoscale:\n  idle_util_percent: 150\n",
        "autoscale.idle_util_percent",
        2,
        "100 or less",
    ),
    ("poll-zero", "autoscale:\n  poll_seconds: 0\n", "autoscale.poll_seconds", 2, "above 0"),
    ("stall-text", "autoscale:\n  stall_minutes: ten\n", "autoscale.stall_minutes", 2, "number"),
    (
        "heartbeat-negative",
        "name: x\nautoscale:\n  heartbeat_minutes: -1\n",
        "autoscale.heartbeat_minutes",
        3,
        "above 0",
    ),
    (
        "replace-lost-text",
        "autoscale:\n  replace_lost: 'yes'\n",
        "autoscale.replace_lost",
        2,
        "true or false",
    ),
    ("nodes-text", 'name: ok\nnodes: "two"\n', "nodes", 2, "whole number"),
    ("nodes-word", "name: ok\nnodes: two\n", "nodes", 2, "'two'"),
    ("nodes-zero", "name: ok\nnodes: 0\n", "nodes", 2, "1 or more"),
    ("nodes-negative", "nodes: -1\n", "nodes", 1, "1 or more"),
    ("nodes-bool", "name: ok\nnodes: true\n", "nodes", 2, "True"),
    ("nodes-float", "nodes: 1.5\n", "nodes", 1, "whole number"),
    ("cpus-zero", "resources:\n  cpus: 0\n", "resources.cpus", 2, "1 or more"),
    ("nproc-zero", "train:\n  nproc_per_node: 0\n", "train.nproc_per_node", 2, "1 or more"),
    ("spot-text", 'name: ok\nspot: "yes"\n', "spot", 2, "true or false"),
    ("spot-number", "spot: 1\n", "spot", 1, "true or false"),
    ("envs-list", "name: ok\nenvs:\n  - A=1\n", "envs", 2, "mapping"),
    ("envs-empty-list", "envs: []\n", "envs", 1, "mapping"),
    ("envs-false", "envs: false\n", "envs", 1, "mapping"),
    ("env-value-mapping", "envs:\n  A: 1\n  B: {c: 1}\n", "envs.B", 3, "single value"),
    ("env-value-list", "envs:\n  B: [1, 2]\n", "envs.B", 2, "single value"),
    ("env-value-null", "envs:\n  B:\n", "envs.B", 2, "single value"),
    ("env-name-digit", "envs:\n  1BAD: x\n", "envs.1BAD", 2, "variable name"),
    ("env-name-hyphen", "envs:\n  MY-VAR: x\n", "envs.MY-VAR", 2, "variable name"),
    ("env-name-number", "envs:\n  12: x\n", "envs.12", 2, "variable name"),
    ("args-mapping", "train:\n  args: {lr: 1}\n", "train.args", 2, "list of arguments"),
    ("args-nested-list", "train:\n  args: [[1]]\n", "train.args", 2, "list of arguments"),
    ("args-null-item", "train:\n  args: [--lr, null]\n", "train.args", 2, "list of arguments"),
    ("args-number", "train:\n  args: 5\n", "train.args", 2, "list of arguments"),
    ("args-open-quote", 'train:\n  args: "--name \'a"\n', "train.args", 2, "quot"),
    ("resources-list", "name: ok\nresources:\n  - A100\n", "resources", 2, "mapping"),
    ("resources-text", "resources: A100:8\n", "resources", 1, "mapping"),
    ("train-text", "train: train.py\n", "train", 1, "mapping"),
    ("autoscale-number", "autoscale: 5\n", "autoscale", 1, "mapping"),
    ("max-cost-negative", "autoscale:\n  max_cost: -1\n", "autoscale.max_cost", 2, "above 0"),
    ("max-cost-zero", "autoscale:\n  max_cost: 0\n", "autoscale.max_cost", 2, "above 0"),
    ("max-cost-nan", "autoscale:\n  max_cost: .nan\n", "autoscale.max_cost", 2, "above 0"),
    ("max-cost-inf", "autoscale:\n  max_cost: .inf\n", "autoscale.max_cost", 2, "above 0"),
    ("max-cost-text", "autoscale:\n  max_cost: '10'\n", "autoscale.max_cost", 2, "number"),
    ("idle-bool", "autoscale:\n  idle_minutes: true\n", "autoscale.idle_minutes", 2, "number"),
    ("gpus-zero", "resources:\n  gpus: 'A100:0'\n", "resources.gpus", 2, "1 or more"),
    ("gpus-x", "resources:\n  gpus: 'A100:x'\n", "resources.gpus", 2, "whole number"),
    ("gpus-no-model", "resources:\n  gpus: ':8'\n", "resources.gpus", 2, "GPU model"),
    ("gpus-no-count", "resources:\n  gpus: 'A100:'\n", "resources.gpus", 2, "whole number"),
    ("gpus-bare-number", "resources:\n  gpus: 8\n", "resources.gpus", 2, "GPU model"),
    ("gpus-two-colons", "resources:\n  gpus: 'A100:8:2'\n", "resources.gpus", 2, "whole number"),
    ("gpus-superscript", "resources:\n  gpus: 'A100:²'\n", "resources.gpus", 2, "whole number"),
    ("gpus-bool", "resources:\n  gpus: true\n", "resources.gpus", 2, "MODEL[:COUNT]"),
    ("gpus-list", "resources:\n  gpus: [A100]\n", "resources.gpus", 2, "MODEL[:COUNT]"),
    ("name-invalid", "nodes: 2\nname: Bad_Name\n", "name", 2, "invalid cluster name"),
    ("name-digit-first", "name: 1abc\n", "name", 1, "a letter first"),
    ("name-too-long", f"name: {'a' * 41}\n", "name", 1, "at most 40"),
    ("name-hyphen-end", "name: abc-\n", "name", 1, "hyphen"),
    ("name-number", "name: 123\n", "name", 1, "text"),
    ("name-empty", "name: ''\n", "name", 1, "empty"),
    ("provider-number", "provider: 5\n", "provider", 1, "text"),
    ("region-list", "region: [a]\n", "region", 1, "text"),
    ("setup-date", "setup: 2024-01-01\n", "setup", 1, "text"),
    ("dup-top", "name: a\nnodes: 1\nnodes: 2\n", "nodes", 3, "duplicate key"),
    ("dup-nested", "envs:\n  A: 1\n  A: 2\n", "envs.A", 3, "duplicate key"),
]


@pytest.mark.parametrize("text, field, line, words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_names_file_line_and_field(tmp_path, text, field, line, words):
    path = write(tmp_path, text)
    message = refusal(path)
    assert message.startswith(f"{path}:{line}: {field}:"), message
    assert words in message


# Refusals where the YAML itself is broken: the message names the file and line of the problem.
BAD_YAML = [
    ("open-flow", "name: ok\nnodes: [1, 2\nspot: true\n", 3),
    ("tab-indent", "name: ok\n\tnodes: 2\n", 2),
    ("bad-indent", "name: ok\nnodes: 2\n  spot: x\n", 3),
    ("unclosed-quote", 'name: "ok\n', 2),
    ("colon-in-value", "resources:\n  gpus: A100:\n", 2),
    ("two-documents", "name: a\n---\nname: b\n", 2),
    ("bad-date", "name: ok\nsetup: 2024-13-45\n", 2),
]


@pytest.mark.parametrize("text, line", [b[1:] for b in BAD_YAML], ids=[b[0] for b in BAD_YAML])
def test_invalid_yaml_names_the_line(tmp_path, text, line):
    path = write(tmp_path, text)
    assert refusal(path).startswith(f"{path}:{line}: not valid YAML: ")


@pytest.mark.parametrize(
    "text, words",
    [
        ("- a\n- b\n", "top level must be a mapping"),
        ("just some text\n", "top level must be a mapping"),
        ("42\n", "top level must be a mapping"),
        ("? [a, b]\n: 1\n", "keys must be plain text"),
        ("envs: &a [*a]\n", "envs"),  # an alias that contains itself
        ("train:\n  args: !!python/object:os.system {}\n", "not valid YAML"),
        ("name: !!python/name:os.system ''\n", "not valid YAML"),
    ],
    ids=["list", "scalar", "number", "complex-key", "self-alias", "py-object", "py-name"],
)
def test_other_refusals(tmp_path, text, words):
    assert words in refusal(write(tmp_path, text))


def test_alias_bomb_is_refused_quickly(tmp_path):
    """Billion laughs: expanding it would take forever; it must be refused at once."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert "a0: unknown field" in refusal(path)
    bomb = "\n".join("  " + line.replace("a", "A", 1) for line in lines)
    path = write(tmp_path, f"nodes: 1\nenvs:\n{bomb}\n")
    assert refusal(path).startswith(f"{path}:3: envs.A0: must be a single value")


def test_aliases_of_plain_values_work(tmp_path):
    spec = load_spec(write(tmp_path, "region: &r us-east-1\nzone: *r\ntrain:\n  args: [*r, *r]\n"))
    assert spec.zone == spec.region == "us-east-1"
    assert spec.train.args == ("us-east-1", "us-east-1")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = refusal(path)
    assert str(path) in message and "not found" in message


def test_directory_instead_of_file(tmp_path):
    assert "cannot read" in refusal(tmp_path)


def test_not_utf8(tmp_path):
    path = write(tmp_path, b"name: \xff\xfe\n")
    assert refusal(path).startswith(f"{path}: not UTF-8")


def test_key_with_newline_keeps_message_on_one_line(tmp_path):
    message = refusal(write(tmp_path, '"a\\nb": 1\n'))
    assert "unknown field" in message
    message = refusal(write(tmp_path, 'envs:\n  "a\\nb": 1\n  "a\\nb": 2\n'))
    assert "duplicate key" in message


# --- parse_gpus / parse_env ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, model, count",
    [
        ("A100:8", "A100", 8),
        ("H100", "H100", 1),
        ("L4:1", "L4", 1),
        ("A100-80GB:8", "A100-80GB", 8),
        ("a10g:4", "a10g", 4),
        ("T4:08", "T4", 8),
    ],
)
def test_parse_gpus_valid(text, model, count):
    assert parse_gpus(text) == GpuSpec(model, count)
    assert str(parse_gpus(text)) == f"{model}:{count}"


@pytest.mark.parametrize(
    "text, words",
    [
        ("A100:0", "1 or more"),
        ("A100:x", "whole number"),
        (":8", "GPU model"),
        ("A100:", "whole number"),
        ("8", "GPU model"),
        ("", "GPU model"),
        ("A100:-1", "whole number"),
        ("A100: 8", "whole number"),
        ("A 100:8", "GPU model"),
        ("A100:²", "whole number"),
        ("A100:٣", "whole number"),
        ("-A100:1", "GPU model"),
    ],
)
def test_parse_gpus_invalid(text, words):
    with pytest.raises(UsageError) as info:
        parse_gpus(text, where="--gpus")
    message = str(info.value)
    assert message.startswith("--gpus: ") and words in message and "\n" not in message


@pytest.mark.parametrize(
    "pairs, expected",
    [
        (["A=1"], {"A": "1"}),
        (["A="], {"A": ""}),
        (["A=x=y"], {"A": "x=y"}),
        (["_a1=v", "B=2", "_a1=w"], {"_a1": "w", "B": "2"}),
        ([], {}),
    ],
)
def test_parse_env_valid(pairs, expected):
    assert parse_env(pairs) == expected


@pytest.mark.parametrize("pair", ["=1", "1A=2", "A-B=1", " A=1", "A B=1", ""])
def test_parse_env_invalid(pair):
    with pytest.raises(UsageError) as info:
        parse_env(["OK=1", pair])
    assert str(info.value).startswith("--env: ") and "KEY=VALUE" in str(info.value)


def test_parse_env_key_alone_takes_the_local_value(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x=y")
    assert parse_env(["HF_TOKEN", "A=1"]) == {"HF_TOKEN": "hf_x=y", "A": "1"}
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UsageError, match=r"^--env HF_TOKEN: HF_TOKEN is not set"):
        parse_env(["HF_TOKEN"])


@pytest.mark.parametrize("path", ["/ckpt", "../ckpt", "a/../../b", "a/.."])
def test_checkpoint_dir_must_stay_in_the_node_directory(tmp_path, path):
    with pytest.raises(UsageError, match=r"mlcloud.yaml:1: checkpoint_dir: .*relative path"):
        load_spec(write(tmp_path, f"checkpoint_dir: {json.dumps(path)}\n"))


# --- properties ------------------------------------------------------------------------------

_NAME_CHARS = set(string.ascii_lowercase + string.digits + "-")


def _follows_rule(name: str) -> bool:
    return (
        1 <= len(name) <= 40
        and name[0] in string.ascii_lowercase
        and set(name) <= _NAME_CHARS
        and not name.endswith("-")
    )


names = st.one_of(
    st.text(),
    st.text(alphabet="abzAZ09-_ .\n\u00e9\u0131", max_size=45),
    st.from_regex(r"[a-z][a-z0-9-]{0,44}", fullmatch=True),
)


@given(names)
@settings(max_examples=300, deadline=None)
def test_cluster_name_property(name):
    try:
        assert check_cluster_name(name) == name
    except UsageError as e:
        assert not _follows_rule(name), f"valid name refused: {name!r}"
        assert "\n" not in str(e) and "at most 40" in str(e)
    else:
        assert _follows_rule(name), f"invalid name accepted: {name!r}"


gpu_texts = st.one_of(
    st.text(),
    st.text(alphabet="AHL10-:x8²٣ G", max_size=12),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,10}(:[0-9]{1,4})?", fullmatch=True),
)


@given(gpu_texts)
@settings(max_examples=300, deadline=None)
def test_parse_gpus_property(text):
    try:
        gpu = parse_gpus(text)
    except UsageError as e:
        assert "\n" not in str(e)
    else:
        assert gpu.count >= 1 and gpu.model and text.startswith(gpu.model)
        assert parse_gpus(str(gpu)) == gpu


yamlish = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.sampled_from(
            [
                "name: ok\n",
                "name: Bad\n",
                "nodes: 2\n",
                "nodes: x\n",
                "resources:\n",
                "  gpus: A100:8\n",
                "  gpus: ':8'\n",
                "  cpus: 4\n",
                "train:\n",
                "  args: [a, 1]\n",
                '  args: "\'a"\n',
                "envs:\n",
                "  A: 1\n",
                "  A: {}\n",
                "  - x\n",
                "autoscale:\n",
                "  max_cost: .nan\n",
                "&a [*a]\n",
                "x: *a\n",
                "? [k]\n",
                ": v\n",
                "spot: yes\n",
                "workdir: ~\n",
                "workdir: ~nosuchuser0/x\n",
                "setup: 2024-13-45\n",
                "\t\n",
                "---\n",
                "{\n",
                "!!binary aGk=\n",
            ]
        ),
        max_size=8,
    ).map("".join),
)


@given(yamlish)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_load_spec_never_crashes(text):
    """Whatever the file holds, load_spec returns a spec or refuses it with one line."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mlcloud.yaml"
        path.write_text(text, errors="surrogatepass")
        try:
            spec = load_spec(path)
        except UsageError as e:
            assert "\n" not in str(e)
        else:
            assert isinstance(spec, TaskSpec)
            assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(
    "text, field, words",
    [
        ("hosts: alice@h1\n", "hosts", "list of [user@]host[:port]"),
        ("hosts: [1, 2]\n", "hosts", "list of"),
        ("ssh: {port: 70000}\n", "ssh.port", "not a TCP port"),
        ("ssh: {port: 0}\n", "ssh.port", "1 or more"),
        ("ssh: {key: x}\n", "ssh.key", "unknown field"),
        ("ssh: [a]\n", "ssh", "mapping"),
    ],
)
def test_bad_ssh_fields(tmp_path, text, field, words):
    with pytest.raises(UsageError) as e:
        load_spec(write(tmp_path, text))
    assert f": {field}:" in str(e.value) and words in str(e.value)


def test_ssh_fields_and_node_count(tmp_path):
    spec = load_spec(
        write(
            tmp_path,
            "hosts: [a@h1, 'b@h2:2222']\nssh:\n  identity_file: k\n"
            "  proxy_command: ssh -W %h:%p bastion\n  python: /opt/py\n",
        )
    )
    assert spec.hosts == ("a@h1", "b@h2:2222") and spec.node_count == 2
    assert spec.ssh.identity_file == str(tmp_path / "k")
    assert spec.ssh.proxy_command == "ssh -W %h:%p bastion" and spec.ssh.python == "/opt/py"


def test_autoscale_defaults_and_a_spec_stored_before_the_new_keys():
    assert AutoscaleSpec() == AutoscaleSpec(
        idle_minutes=30.0,
        idle_util_percent=5.0,
        stall_minutes=10.0,
        on_stall="report",
        max_cost=None,
        heartbeat_minutes=15.0,
        replace_lost=True,
        poll_seconds=5.0,
    )
    old = TaskSpec.from_dict({"autoscale": {"idle_minutes": None, "max_cost": 4}})
    assert old.autoscale == AutoscaleSpec(max_cost=4.0)
    assert TaskSpec.from_dict(TaskSpec().to_dict()).autoscale == AutoscaleSpec()
