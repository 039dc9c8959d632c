"""The task spec: `mlcloud.yaml` plus command-line flags, validated into typed dataclasses.

Every refusal is one line naming the file, line and field, so a person can fix it at once.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mlcloud import numbers
from mlcloud.errors import UsageError

_GPU_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# ASCII digits only: str.isdigit() also takes '²', which int() refuses
_COUNT_RE = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class GpuSpec:
    model: str
    count: int

    def __str__(self) -> str:
        return f"{self.model}:{self.count}"


@dataclass(frozen=True)
class Resources:
    gpus: GpuSpec | None = None
    cpus: int | None = None
    instance_type: str | None = None
    disk_gb: int | None = None


@dataclass(frozen=True)
class TrainSpec:
    script: str | None = None
    args: tuple[str, ...] = ()
    nproc_per_node: int | None = None


ON_STALL = ("report", "stop")
MINUTES_MAX = 525_600  # a year: the most any of the autoscale minutes may be
POLL_MIN_S = 0.5  # as `autoscale --interval`: a faster poll only spins
MAX_NODES = 10_000


@dataclass(frozen=True)
class AutoscaleSpec:
    """What the node agent and the controller enforce (README, "Autoscaling and the dead-man
    switch"); minutes may be fractions, so tests can use seconds."""

    idle_minutes: float = 30.0
    idle_util_percent: float = 5.0
    stall_minutes: float = 10.0
    on_stall: str = "report"
    max_cost: float | None = None  # USD over the cluster's life; None: no budget
    heartbeat_minutes: float = 15.0
    replace_lost: bool = True
    poll_seconds: float = 5.0


@dataclass(frozen=True)
class SshSpec:
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    proxy_command: str | None = None  # OpenSSH style: %h and %p are substituted
    python: str | None = None  # the nodes' python (default: python3 on the remote PATH)
    allowed_cidrs: tuple[str, ...] = ()  # clouds: who may reach port 22 (default: the caller)


@dataclass(frozen=True)
class StorageSpec:
    """Buckets the nodes use (README, "Buckets"): checkpoints read and written, data only read.
    Each is a checked `s3://bucket/prefix` or `gs://bucket/prefix` (mlcloud/spec/buckets.py).
    `checkpoints` is one location for every cloud, or one per cloud ({"aws": "s3://..",
    "gce": "gs://.."}) so a job that moves between clouds keeps its checkpoints near."""

    checkpoints: str | dict[str, str] | None = None
    data: tuple[str, ...] = ()

    def checkpoints_for(self, cloud: str) -> str | None:
        """The checkpoint location a node of `cloud` uses (None: none for that cloud)."""
        if isinstance(self.checkpoints, dict):
            return self.checkpoints.get(cloud)
        return self.checkpoints


ON_FAILURE = ("stop", "restart")
MOVE_SAVINGS = 0.3
_PLACEMENT_RE = re.compile(r"[a-z][a-z0-9-]*(:[a-z0-9][a-z0-9-]*)?")


@dataclass(frozen=True)
class RecoverSpec:
    """How `mlcloud launch` keeps a managed job alive (README, "Managed jobs"): the ladder's
    limits, where the job may go (`CLOUD[:REGION|:ZONE]`, tried cheapest first; empty: the
    spec's own provider in every region the catalog has an offer in), and whether a lower
    price moves it (move_savings None: never)."""

    max_restarts: int = 10
    max_restarts_in_place: int | None = None  # None: bounded by max_restarts only
    placements: tuple[str, ...] = ()
    move_savings: float | None = MOVE_SAVINGS
    on_failure: str = "stop"


@dataclass(frozen=True)
class GceSpec:
    project: str | None = None  # default: GOOGLE_CLOUD_PROJECT, gcloud's, the credentials'
    api_endpoint: str | None = None  # a private Compute endpoint (MLCLOUD_GCE_API_ENDPOINT)


@dataclass(frozen=True)
class TaskSpec:
    name: str | None = None
    provider: str | None = None
    nodes: int | None = None  # default: one per host for the ssh provider, else 1; elastic: MAX
    min_nodes: int | None = None  # elastic size (`nodes: "MIN:MAX"`): the fewest the job runs on
    resources: Resources = field(default_factory=Resources)
    region: str | None = None
    zone: str | None = None
    spot: bool = False
    spot_max_price: float | None = None
    image: str | None = None
    workdir: str | None = None
    max_workdir_files: int | None = None  # train refuses a larger workdir (remote/sync.py)
    max_workdir_size: int | None = None  # bytes; written 5GiB, 500MB in the spec
    setup: str | None = None
    train: TrainSpec = field(default_factory=TrainSpec)
    envs: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: str | None = None
    autoscale: AutoscaleSpec = field(default_factory=AutoscaleSpec)
    hosts: tuple[str, ...] = ()
    ssh: SshSpec = field(default_factory=SshSpec)
    gce: GceSpec = field(default_factory=GceSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    recover: RecoverSpec = field(default_factory=RecoverSpec)

    @property
    def node_count(self) -> int:
        return self.nodes or len(self.hosts) or 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hosts"] = list(self.hosts)
        d["ssh"]["allowed_cidrs"] = list(self.ssh.allowed_cidrs)
        d["resources"]["gpus"] = str(self.resources.gpus) if self.resources.gpus else None
        d["train"]["args"] = list(self.train.args)
        d["storage"]["data"] = list(self.storage.data)
        d["recover"]["placements"] = list(self.recover.placements)
        if self.recover.move_savings is None:
            d["recover"]["move_savings"] = "off"
        min_nodes = d.pop("min_nodes")
        if min_nodes is not None:
            d["nodes"] = f"{min_nodes}:{self.nodes}"
        return d

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        """Rebuild a spec stored in state (already validated when it was written)."""
        return _build(d, _Where("state", {}, stored=True))


def parse_nodes(value: Any, where: str = "--nodes") -> tuple[int | None, int]:
    """(MIN, MAX) from `N` (fixed size: MIN is None) or `MIN:MAX` (elastic, 1 <= MIN <= MAX)."""
    bad = UsageError(
        f"{where}: must be a whole number of 1 or more (up to {MAX_NODES:,}), or MIN:MAX "
        f"(e.g. 2:4), got {numbers.short(value)}"
    )
    if isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", value) if isinstance(value, str) else None
        if not m:
            raise bad
        parts = [int(p) for p in m.groups() if p is not None]
    try:  # each count through the one number check (mlcloud/numbers.py)
        low, high = (numbers.check(p, 1, MAX_NODES, whole=True) for p in (parts[0], parts[-1]))
    except numbers.Invalid:
        raise bad from None
    if high < low:
        raise bad
    return (int(low) if len(parts) == 2 else None), int(high)


def parse_gpus(text: str, where: str = "--gpus") -> GpuSpec:
    """`A100:8`, `H100`, `A100-80GB:8` -> GpuSpec; anything else is refused with the form."""
    model, sep, count = str(text).partition(":")
    hint = "use MODEL[:COUNT], e.g. A100:8 or H100"
    if not _GPU_RE.fullmatch(model):
        raise UsageError(f"{where}: {text!r} has no valid GPU model; {hint}")
    if not sep:
        return GpuSpec(model, 1)
    if not _COUNT_RE.fullmatch(count):
        raise UsageError(f"{where}: {text!r} has a GPU count that is not a whole number; {hint}")
    try:
        numbers.check(int(count), 1, 1024, whole=True)
    except numbers.Invalid:
        raise UsageError(
            f"{where}: {numbers.short(text)} asks for {numbers.short(int(count))} GPUs; the "
            "count must be 1 or more (up to 1024)"
        ) from None
    return GpuSpec(model, int(count))


def parse_env(pairs: list[str], where: str = "--env") -> dict[str, str]:
    """KEY=VALUE, or KEY alone to pass the local environment's value (keeps secrets out of
    argv and shell history)."""
    import os

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not _ENV_RE.fullmatch(key):
            raise UsageError(f"{where}: {pair!r} is not KEY=VALUE or KEY, with KEY like MY_VAR")
        if not sep:
            if key not in os.environ:
                raise UsageError(
                    f"{where} {key}: {key} is not set in this environment; set it, or pass "
                    f"{key}=VALUE"
                )
            value = os.environ[key]
        out[key] = value
    return out


def check_checkpoint_dir(path: str, where: str) -> str:
    """checkpoint_dir lives in the node's own directory: a relative path without `..`."""
    from pathlib import PurePosixPath

    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not path.strip():
        raise UsageError(
            f"{where}: {path!r} must be a relative path inside the node's directory, without "
            "`..` (e.g. checkpoints)"
        )
    return path


def load_spec(path: Path) -> TaskSpec:
    """Read and validate a spec file; relative paths in it are relative to the file."""
    import yaml

    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"spec file {path} not found") from None
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read spec file {path}: {e.strerror}") from None
    try:
        data, lines = _compose(text, str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        if context and getattr(e, "problem", None):
            problem = f"{context}, {problem}"
        raise UsageError(f"{path}{line}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    where = _Where(str(path), lines)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a mapping of fields (name:, nodes:, ...)")
    spec = _build(data, where)
    base = path.parent
    if spec.workdir is not None:
        try:
            workdir = (base / os.path.expanduser(spec.workdir)).resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise UsageError(f"{where('workdir')}: cannot resolve {spec.workdir!r}: {e}") from None
        spec = replace(spec, workdir=str(workdir))
    if spec.ssh.identity_file is not None:
        identity = (base / os.path.expanduser(spec.ssh.identity_file)).resolve()
        spec = replace(spec, ssh=replace(spec.ssh, identity_file=str(identity)))
    return spec


class _Where:
    """Turns a field path into `file:line: field` for messages."""

    def __init__(self, source: str, lines: dict[str, int], stored: bool = False):
        self.source, self.lines = source, lines
        self.stored = stored  # a spec state kept (its empty lists are its defaults), not a file

    def __call__(self, key: str) -> str:
        line = self.lines.get(key)
        shown = key if key.isprintable() else repr(key)  # keep the message on one line
        return f"{self.source}:{line}: {shown}" if line else f"{self.source}: {shown}"


_YAML_MAP = "tag:yaml.org,2002:map"
_YAML_SEQ = "tag:yaml.org,2002:seq"
_YAML_SEXAGESIMAL = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _compose(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Safe-load YAML, recording the line of every mapping key and refusing duplicate keys.

    Each node is built once (aliases share the result), so alias bombs stay linear and a
    self-referencing alias cannot recurse forever.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        lines: dict[str, int] = {}
        built: dict[int, Any] = {}

        def scalar(node: yaml.Node) -> Any:
            if node.tag in _YAML_SEXAGESIMAL and ":" in node.value:
                # YAML 1.1 reads a plain 2:4 as base 60 (124); YAML 1.2 and every user read
                # text: `nodes: 2:4` is MIN:MAX, never 124 nodes
                return node.value
            try:
                return loader.construct_object(node, deep=True)
            except ValueError as e:  # e.g. a timestamp like 2024-13-45
                raise UsageError(
                    f"{source}:{node.start_mark.line + 1}: not valid YAML: "
                    f"{node.value!r}: {str(e).splitlines()[0]}"
                ) from None

        def walk(node: yaml.Node, prefix: str) -> Any:
            if id(node) in built:
                return built[id(node)]
            plain = {yaml.MappingNode: _YAML_MAP, yaml.SequenceNode: _YAML_SEQ}.get(type(node))
            if plain and node.tag != plain:  # e.g. !!python/object, !!set: refused, not ignored
                raise UsageError(
                    f"{source}:{node.start_mark.line + 1}: not valid YAML: "
                    f"tag {node.tag!r} is not allowed in a spec"
                )
            if isinstance(node, yaml.MappingNode):
                out: dict[Any, Any] = {}
                built[id(node)] = out
                for k, v in node.value:
                    line = k.start_mark.line + 1
                    if not isinstance(k, yaml.ScalarNode):
                        raise UsageError(
                            f"{source}:{line}: {prefix.rstrip('.') or 'top level'}: "
                            "keys must be plain text"
                        )
                    key = scalar(k)
                    dotted = f"{prefix}{key}"
                    if key in out:
                        shown = dotted if dotted.isprintable() else repr(dotted)
                        raise UsageError(f"{source}:{line}: {shown}: duplicate key")
                    lines.setdefault(dotted, line)
                    out[key] = walk(v, dotted + ".")
                return out
            if isinstance(node, yaml.SequenceNode):
                items: list[Any] = []
                built[id(node)] = items
                items.extend(walk(v, prefix) for v in node.value)
                return items
            value = scalar(node)
            built[id(node)] = value
            return value

        return (walk(root, "") if root is not None else None), lines
    finally:
        loader.dispose()


_FIELDS = {
    "": {
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
    },
    "recover": {
        "max_restarts",
        "max_restarts_in_place",
        "placements",
        "move_savings",
        "on_failure",
    },
    "gce": {"project", "api_endpoint"},
    "storage": {"checkpoints", "data"},
    "ssh": {"user", "port", "identity_file", "proxy_command", "python", "allowed_cidrs"},
    "resources": {"gpus", "cpus", "instance_type", "disk_gb"},
    "train": {"script", "args", "nproc_per_node"},
    "autoscale": {
        "idle_minutes",
        "idle_util_percent",
        "stall_minutes",
        "on_stall",
        "max_cost",
        "heartbeat_minutes",
        "replace_lost",
        "poll_seconds",
    },
}


def _check_keys(d: dict, section: str, where: _Where) -> None:
    allowed = _FIELDS[section]
    prefix = f"{section}." if section else ""
    for key in d:
        if key not in allowed:
            raise UsageError(
                f"{where(prefix + str(key))}: unknown field; "
                f"{'in ' + section + ' ' if section else ''}expected one of "
                f"{', '.join(sorted(allowed))}"
            )


def _section(d: dict, key: str, where: _Where) -> dict:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where(key)}: must be a mapping, got {_kind(value)}")
    _check_keys(value, key, where)
    return value


def _kind(value: Any) -> str:
    return {
        bool: "true/false",
        int: "a number",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _str(d: dict, key: str, where: _Where, path: str | None = None) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{where(path or key)}: must be non-empty text, got {_kind(value)}")
    if not value.strip():
        raise UsageError(f"{where(path or key)}: must be non-empty text, got empty text")
    return value


def _int(
    d: dict, key: str, where: _Where, path: str | None = None, high: int = numbers.MAX_INT
) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    return int(_number(value, where(path or key), 1, high, whole=True))


def _positive(
    d: dict, key: str, where: _Where, path: str, low: float = 0, high: float = 1e9
) -> float | None:
    """A number above 0 (or from `low`, when it is above 0) up to high."""
    value = d.get(key)
    if value is None:
        return None
    return float(_number(value, where(path), low, high, above=low == 0))


def _number(value: Any, where: str, low: float, high: float, **kw: bool) -> float | int:
    """The one number check (mlcloud/numbers.py), refusing with the file, line and key."""
    try:
        return numbers.check(value, low, high, **kw)
    except numbers.Invalid as e:
        raise UsageError(f"{where}: {e}") from None


def _build(d: dict, where: _Where) -> TaskSpec:
    _check_keys(d, "", where)
    name = _str(d, "name", where)
    if name is not None:
        try:
            check_cluster_name(name)
        except UsageError as e:
            raise UsageError(f"{where('name')}: {e}") from None
    res = _section(d, "resources", where)
    gpus = res.get("gpus")
    if gpus is not None:
        if isinstance(gpus, bool) or not isinstance(gpus, str | int):
            raise UsageError(f"{where('resources.gpus')}: must be MODEL[:COUNT], e.g. A100:8")
        gpu_spec = parse_gpus(str(gpus), where("resources.gpus"))
    else:
        gpu_spec = None
    train = _section(d, "train", where)
    args = train.get("args")
    if args is None:
        args = []
    if isinstance(args, str):
        import shlex

        try:
            args = shlex.split(args)
        except ValueError as e:  # an unclosed quote
            raise UsageError(
                f"{where('train.args')}: cannot split into arguments: {e}; "
                "close the quote or write a list"
            ) from None
    if not isinstance(args, list) or any(isinstance(a, dict | list) or a is None for a in args):
        raise UsageError(
            f"{where('train.args')}: must be a list of arguments, e.g. ['--lr', '0.1']"
        )
    envs = d.get("envs")
    if envs is None:
        envs = {}
    if not isinstance(envs, dict):
        raise UsageError(f"{where('envs')}: must be a mapping of NAME: value")
    for k, v in envs.items():
        if not isinstance(k, str) or not _ENV_RE.fullmatch(k):
            raise UsageError(f"{where('envs.' + str(k))}: not a valid variable name (like MY_VAR)")
        if isinstance(v, dict | list) or v is None:
            raise UsageError(f"{where('envs.' + k)}: must be a single value, got {_kind(v)}")
    spot = d.get("spot")
    if spot is None:
        spot = False
    if not isinstance(spot, bool):
        raise UsageError(f"{where('spot')}: must be true or false, got {spot!r}")
    auto = _section(d, "autoscale", where)
    hosts = d.get("hosts")
    if hosts is None:
        hosts = []
    elif hosts == [] and not where.stored:
        raise empty_list(where("hosts"), "['alice@10.0.0.5', 'alice@10.0.0.6']")
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise UsageError(
            f"{where('hosts')}: must be a list of [user@]host[:port], e.g. "
            "['alice@10.0.0.5', 'alice@10.0.0.6']"
        )
    max_size = d.get("max_workdir_size")
    if max_size is not None:
        from mlcloud.remote.sync import parse_size

        max_size = parse_size(max_size, where("max_workdir_size"))
    ssh = _section(d, "ssh", where)
    gce = _section(d, "gce", where)
    port = _int(ssh, "port", where, "ssh.port")
    if port is not None and port > 65535:
        raise UsageError(f"{where('ssh.port')}: {port} is not a TCP port (1-65535)")
    min_nodes, max_nodes = (
        parse_nodes(d["nodes"], where("nodes")) if d.get("nodes") is not None else (None, None)
    )
    return TaskSpec(
        name=name,
        provider=_str(d, "provider", where),
        nodes=max_nodes,
        min_nodes=min_nodes,
        resources=Resources(
            gpus=gpu_spec,
            cpus=_int(res, "cpus", where, "resources.cpus"),
            instance_type=_str(res, "instance_type", where, "resources.instance_type"),
            disk_gb=_int(res, "disk_gb", where, "resources.disk_gb"),
        ),
        region=_str(d, "region", where),
        zone=_str(d, "zone", where),
        spot=spot,
        spot_max_price=_positive(d, "spot_max_price", where, "spot_max_price", high=1e6),
        image=_str(d, "image", where),
        workdir=_str(d, "workdir", where),
        max_workdir_files=_int(d, "max_workdir_files", where),
        max_workdir_size=max_size,
        setup=_str(d, "setup", where),
        train=TrainSpec(
            script=_str(train, "script", where, "train.script"),
            args=tuple(_scalar(a) for a in args),
            nproc_per_node=_int(train, "nproc_per_node", where, "train.nproc_per_node", high=4096),
        ),
        envs={k: _scalar(v) for k, v in envs.items()},
        checkpoint_dir=_checkpoint_dir(d, where),
        autoscale=_autoscale(auto, where),
        hosts=tuple(h.strip() for h in hosts),
        ssh=SshSpec(
            user=_str(ssh, "user", where, "ssh.user"),
            port=port,
            identity_file=_str(ssh, "identity_file", where, "ssh.identity_file"),
            proxy_command=_str(ssh, "proxy_command", where, "ssh.proxy_command"),
            python=_str(ssh, "python", where, "ssh.python"),
            allowed_cidrs=_cidrs(ssh, where),
        ),
        gce=GceSpec(
            project=_str(gce, "project", where, "gce.project"),
            api_endpoint=_str(gce, "api_endpoint", where, "gce.api_endpoint"),
        ),
        storage=_storage(_section(d, "storage", where), where),
        recover=_recover(_section(d, "recover", where), where),
    )


def _recover(rec: dict, where: _Where) -> RecoverSpec:
    """The recover section; a key left out (or stored as null) takes its default."""
    default = RecoverSpec()
    restarts = rec.get("max_restarts")
    max_restarts = (
        default.max_restarts
        if restarts is None
        else int(_number(restarts, where("recover.max_restarts"), 0, 10_000, whole=True))
    )
    in_place = rec.get("max_restarts_in_place")
    if in_place is not None:
        in_place = int(
            _number(in_place, where("recover.max_restarts_in_place"), 0, 10_000, whole=True)
        )
    placements = rec.get("placements")
    if placements is None:
        placements = []
    elif placements == [] and not where.stored:
        raise empty_list(where("recover.placements"), "['aws:us-east-1', 'gce:europe-west4']")
    if isinstance(placements, str):
        placements = [placements]
    if not isinstance(placements, list):
        raise UsageError(
            f"{where('recover.placements')}: must be a list of CLOUD[:REGION|:ZONE], e.g. "
            "['aws:us-east-1', 'gce:europe-west4']"
        )
    for p in placements:  # the form here; the catalog's clouds, regions and zones at launch
        if not isinstance(p, str) or not _PLACEMENT_RE.fullmatch(p.strip()):  # (spec/offers.py)
            raise UsageError(
                f"{where('recover.placements')}: {numbers.short(p)} is not CLOUD, CLOUD:REGION "
                "or CLOUD:ZONE (e.g. aws, aws:us-east-1, aws:us-east-1a, gce:europe-west4)"
            )
    savings = rec.get("move_savings")
    if savings is None:
        move_savings: float | None = default.move_savings
    elif savings == "off" or savings is False:  # YAML 1.1 reads a plain off as false
        move_savings = None
    else:
        move_savings = float(_number(savings, where("recover.move_savings"), 0, 1, above=True))
    on_failure = rec.get("on_failure")
    if on_failure is None:
        on_failure = default.on_failure
    if on_failure not in ON_FAILURE:
        raise UsageError(
            f"{where('recover.on_failure')}: must be one of {', '.join(ON_FAILURE)}, "
            f"got {numbers.short(on_failure)}"
        )
    return RecoverSpec(
        max_restarts=max_restarts,
        max_restarts_in_place=in_place,
        placements=tuple(dict.fromkeys(p.strip() for p in placements)),
        move_savings=move_savings,
        on_failure=on_failure,
    )


def _storage(storage: dict, where: _Where) -> StorageSpec:
    """Bucket URIs, each checked (scheme, bucket naming rules, prefix) and written back in one
    canonical form; the first bad one is named with its field."""
    from mlcloud.spec import buckets

    def uri(value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise UsageError(
                f"{where(key)}: must be a bucket URI like s3://BUCKET/PREFIX, got {_kind(value)}"
            )
        try:
            return str(buckets.parse(value))
        except ValueError as e:
            raise UsageError(f"{where(key)}: {value.strip()!r} {e}") from None

    data = storage.get("data")
    if data is None:
        data = []
    elif data == [] and not where.stored:
        raise empty_list(where("storage.data"), "['s3://BUCKET/PREFIX']")
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list):
        raise UsageError(
            f"{where('storage.data')}: must be a list of bucket URIs like ['s3://BUCKET/PREFIX']"
        )
    return StorageSpec(
        checkpoints=_checkpoints(storage.get("checkpoints"), uri, where),
        data=tuple(dict.fromkeys(uri(v, "storage.data") for v in data)),
    )


def _checkpoints(value: Any, uri, where: _Where) -> str | dict[str, str] | None:
    """One URI, or a mapping cloud -> URI whose scheme is that cloud's (aws: s3://, gce:
    gs://): a node only gets credentials for its own cloud's buckets."""
    from mlcloud.spec import buckets

    key = "storage.checkpoints"
    if value is None or isinstance(value, str):
        return None if value is None else uri(value, key)
    if not isinstance(value, dict):
        raise UsageError(
            f"{where(key)}: must be a bucket URI like s3://BUCKET/PREFIX or one per cloud like "
            f"{{aws: s3://BUCKET/PREFIX, gce: gs://BUCKET/PREFIX}}, got {_kind(value)}"
        )
    if not value:
        raise UsageError(
            f"{where(key)}: an empty mapping; name one location per cloud, e.g. "
            "{aws: s3://BUCKET/PREFIX, gce: gs://BUCKET/PREFIX}, or leave it out"
        )
    schemes = {cloud: scheme for scheme, cloud in buckets.SCHEMES.items()}
    out = {}
    for cloud, loc in value.items():
        field = f"{key}.{cloud}"
        if cloud not in schemes:
            raise UsageError(
                f"{where(field)}: unknown cloud {cloud!r}; the clouds with buckets are "
                + ", ".join(sorted(schemes))
            )
        out[cloud] = uri(loc, field)
        if not out[cloud].startswith(f"{schemes[cloud]}://"):
            raise UsageError(
                f"{where(field)}: {loc.strip()!r} is another cloud's bucket: write "
                f"{schemes[cloud]}://BUCKET/PREFIX ({cloud} nodes get credentials for their "
                "own cloud's buckets only)"
            )
    return dict(sorted(out.items()))


def _autoscale(auto: dict, where: _Where) -> AutoscaleSpec:
    """The autoscale section; a key left out (or stored as null) takes its default."""
    default = AutoscaleSpec()

    def number(key: str, low: float = 0, high: float = MINUTES_MAX) -> float:
        value = _positive(auto, key, where, f"autoscale.{key}", low, high)
        return getattr(default, key) if value is None else value

    util = number("idle_util_percent", high=100)
    on_stall = auto.get("on_stall")
    if on_stall is None:
        on_stall = default.on_stall
    if on_stall not in ON_STALL:
        raise UsageError(
            f"{where('autoscale.on_stall')}: must be one of {', '.join(ON_STALL)}, got {on_stall!r}"
        )
    replace_lost = auto.get("replace_lost")
    if replace_lost is None:
        replace_lost = default.replace_lost
    if not isinstance(replace_lost, bool):
        raise UsageError(
            f"{where('autoscale.replace_lost')}: must be true or false, got {replace_lost!r}"
        )
    return AutoscaleSpec(
        idle_minutes=number("idle_minutes"),
        idle_util_percent=util,
        stall_minutes=number("stall_minutes"),
        on_stall=on_stall,
        max_cost=_positive(auto, "max_cost", where, "autoscale.max_cost"),
        heartbeat_minutes=number("heartbeat_minutes"),
        replace_lost=replace_lost,
        # a cluster stored before the floor keeps its poll
        poll_seconds=number("poll_seconds", 0 if where.stored else POLL_MIN_S, 86400),
    )


def _checkpoint_dir(d: dict, where: _Where) -> str | None:
    path = _str(d, "checkpoint_dir", where)
    return None if path is None else check_checkpoint_dir(path, where("checkpoint_dir"))


def _cidrs(ssh: dict, where: _Where) -> tuple[str, ...]:
    value = ssh.get("allowed_cidrs")
    if value is None:
        return ()
    if value == [] and not where.stored:
        raise empty_list(where("ssh.allowed_cidrs"), "['203.0.113.4/32']")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise UsageError(f"{where('ssh.allowed_cidrs')}: must be a list like ['203.0.113.4/32']")
    return tuple(check_cidr(str(v), where("ssh.allowed_cidrs")) for v in value)


def empty_list(where: str, example: str) -> UsageError:
    """An empty list given is a mistake (an unset variable in CI), never the default: `--hosts
    ""` must not quietly make a local cluster."""
    return UsageError(
        f"{where}: an empty list; name at least one, e.g. {example}, or leave it out for the "
        "default"
    )


def split_list(value: str | None, where: str, example: str) -> tuple[str, ...] | None:
    """A comma-separated flag's items (None: not given). Empty (``, `,`), or with an empty
    item (`a,,b`, `$H1,$H2` with H2 unset), is refused."""
    if value is None:
        return None
    items = tuple(item.strip() for item in value.split(","))
    if not any(items):
        raise empty_list(where, example)
    if not all(items):
        raise UsageError(f"{where}: {value!r} has an empty item; give e.g. {example}")
    return items


def check_cidr(text: str, where: str = "--allow-ssh-from") -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise UsageError(
            f"{where}: {text!r} is not an address or CIDR like 203.0.113.4/32"
        ) from None


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


NAME_RULE = "a letter first, then lowercase letters, digits and hyphens, at most 40 characters"
_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,39}")


def check_cluster_name(name: str) -> str:
    """Return the name if valid, else raise a UsageError that states the rule."""
    if not _NAME_RE.fullmatch(name) or name.endswith("-"):
        raise UsageError(
            f"invalid cluster name {name!r}: use {NAME_RULE}, not ending in a hyphen "
            "(e.g. 'llm-train-2')"
        )
    return name
