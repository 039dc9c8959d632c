"""The provider contract: a small typed Protocol over dataclasses.

A provider creates, lists (by tag: the cloud is the source of truth) and terminates a cluster's
nodes, and says how to reach each node. Retries, failover and state live in the engine, which
reads only the typed errors below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, get_args

from mlcloud.errors import EXIT_AUTH, EXIT_CAPACITY, EXIT_QUOTA, MlcloudError

if TYPE_CHECKING:
    from mlcloud.remote.transport import Transport


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do, so the engine asks instead of probing with hasattr."""

    spot: bool = False  # preemptible/Spot nodes
    # the cloud itself ends nodes at a deadline nothing on the VM can cancel (GCE
    # scheduling.maxRunDuration)
    self_deadline: bool = False
    # nodes are machines mlcloud created and pays for: a node that shuts itself down is
    # terminated (aws, gce). False: processes on machines mlcloud does not own (local, ssh),
    # never powered off; the engine stops them before `terminate`
    owns_machines: bool = False


@dataclass(frozen=True)
class ClusterRef:
    """Who a resource belongs to: every cloud resource carries these as tags/labels."""

    name: str
    uid: str
    owner: str
    region: str | None = None  # where the cluster lives, once the engine has chosen

    @property
    def tags(self) -> dict[str, str]:
        return {"mlcloud-cluster": self.uid, "mlcloud-name": self.name, "mlcloud-owner": self.owner}


@dataclass(frozen=True)
class SshOptions:
    """The user's SSH settings (spec `ssh:` and flags); each provider fills in what is unset."""

    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    proxy_command: str | None = None
    python: str | None = None
    allowed_cidrs: tuple[str, ...] = ()  # who may reach port 22 (default: the caller)


@dataclass(frozen=True)
class StorageAccess:
    """Bucket prefixes (`s3://bucket/prefix`, `gs://bucket/prefix`) the nodes use: a provider
    that can give nodes credentials scoped to them (an AWS instance profile) does, for its own
    cloud's buckets; the others are the user's to grant."""

    read: tuple[str, ...] = ()  # data: list and read
    write: tuple[str, ...] = ()  # checkpoints: list, read, write and delete


@dataclass(frozen=True)
class ProvisionRequest:
    """What the engine asks of a provider, resolved from the spec and flags."""

    count: int
    gpus: str | None = None
    instance_type: str | None = None
    cpus: int | None = None
    region: str | None = None
    zone: str | None = None
    spot: bool = False
    max_price: float | None = None  # spot: the most to pay per node-hour
    image: str | None = None
    disk_gb: int | None = None
    fallback_regions: tuple[str, ...] = ()  # where else to look when `region` has no capacity
    hosts: tuple[str, ...] = ()  # the ssh provider: machines the user already has
    ssh: SshOptions = SshOptions()
    storage: StorageAccess = StorageAccess()  # none: the nodes get no bucket credentials
    project: str | None = None  # gce: the Google Cloud project (default: ADC's, the env's)
    api_endpoint: str | None = None  # gce: a private (or test) Compute API endpoint
    deadline: float | None = None  # epoch s the budget runs out: clouds that can end VMs then do
    # the number of the first node `create` makes (the next ones follow): one past the highest
    # the cluster ever used, so a number (the node's `node-K` root, its process tag) names one
    # node for the cluster's whole life; ssh numbers a node by its host's place in the list
    first_number: int = 0


@dataclass(frozen=True)
class Prepared:
    """What prepare() settled: the request as the provider will serve it, with its own choices
    pinned (machine image, login user) for the engine to record, and what it goes without
    (a placement group the endpoint lacks), for the engine to tell the user once."""

    request: ProvisionRequest
    warnings: tuple[str, ...] = ()


# A node's state in mlcloud's own words: each provider maps its cloud's states onto these, so
# the engine reads no cloud's names. State rows keep them as text.
NodeStatus = Literal["pending", "running", "stopping", "stopped", "terminated"]
NODE_STATUSES: tuple[NodeStatus, ...] = get_args(NodeStatus)
PENDING: NodeStatus = "pending"  # being made (or repaired): not up yet
RUNNING: NodeStatus = "running"
STOPPING: NodeStatus = "stopping"  # on its way to stopped or gone
STOPPED: NodeStatus = "stopped"  # powered off, its disk kept
TERMINATED: NodeStatus = "terminated"  # gone for good, or (local, ssh) stopped by a rule
GONE: frozenset[NodeStatus] = frozenset({STOPPING, STOPPED, TERMINATED})  # runs nothing

# Where torch lives on the images users start from: the AWS Deep Learning AMIs keep it apart
# from the system python3, older GCE Deep Learning VMs in conda.
PYTHONS = ("/opt/pytorch/bin/python", "/opt/conda/bin/python", "python3")


@dataclass(frozen=True)
class Node:
    """One machine of a cluster as the provider sees it."""

    node_id: str
    ip: str  # where mlcloud reaches the node
    private_ip: str  # where the other nodes reach it (rendezvous, NCCL/gloo)
    root: str  # the node's mlcloud directory: code, jobs, checkpoints
    status: NodeStatus = RUNNING


@dataclass(frozen=True)
class Quote:
    """A price the cloud's own API gives now: USD per node-hour of an instance type, for one
    zone where the cloud prices its zones apart (EC2 Spot), else the region (zone None)."""

    instance_type: str
    region: str
    zone: str | None
    price: float


@dataclass(frozen=True)
class Resource:
    """Something a provider holds for a cluster, found by tag (for `mlcloud gc`)."""

    provider: str
    kind: str  # instance, security-group, key-pair, ...
    id: str
    cluster_uid: str
    cluster_name: str
    owner: str  # the home id that made it (mlcloud-owner)
    region: str
    identity: str = ""  # the cloud identity that made it (AWS: the caller's ARN)
    created: float | None = None  # epoch seconds: launch or creation time, when known


class ProviderError(MlcloudError):
    """The provider failed in a way no retry elsewhere will fix."""


class CapacityError(ProviderError):
    """No capacity in this zone: the engine may try the next zone or region."""

    exit_code = EXIT_CAPACITY

    def __init__(self, zone: str, message: str):
        super().__init__(message)
        self.zone = zone


class QuotaError(ProviderError):
    """A quota (regional on every cloud) refused the request: the engine tries the next region."""

    exit_code = EXIT_QUOTA

    def __init__(self, scope: str, message: str):
        super().__init__(message)
        self.scope = scope


class AuthError(ProviderError):
    """No credentials, or the cloud refused them."""

    exit_code = EXIT_AUTH


class Provider(Protocol):
    """Every member exists on every provider; what differs between them is in `capabilities`."""

    name: ClassVar[str]
    boot_timeout: ClassVar[float]  # how long a new node may take to answer SSH
    capabilities: ClassVar[Capabilities]
    # the interpreters bootstrap tries, in order, for the one that has torch (unless the spec
    # names one): PYTHONS on machines mlcloud knows only by their image; local: its own
    pythons: ClassVar[tuple[str, ...]]

    def default_region(self) -> str | None:
        """Where a cluster goes when neither the spec nor the flags say (None: no regions)."""

    def configured(self) -> bool:
        """Whether this machine shows credentials for the provider (environment or files, no
        network call), so a GPU ask prefers the clouds the user can use."""

    def placements(self, request: ProvisionRequest) -> list[tuple[str | None, str | None]]:
        """(region, zone) pairs to try in order; the engine moves on when one has no capacity."""

    def check(self, request: ProvisionRequest) -> None:
        """Refuse a request this provider cannot serve, before anything is recorded or made."""

    def prepare(self, cluster: ClusterRef, request: ProvisionRequest) -> Prepared:
        """Create cluster-wide resources (network rules, key pairs); idempotent. The engine
        creates and bootstraps with the returned request and records its choices."""

    def create(self, cluster: ClusterRef, request: ProvisionRequest, count: int) -> list[Node]:
        """Create `count` more nodes, all or nothing, tagged with the cluster, numbered from
        `request.first_number` up (above any number it still holds): each node's root ends
        in `node-K` and the number comes back with it from `list`."""

    def list(self, cluster: ClusterRef) -> list[Node]:
        """The cluster's live nodes, found by tag, in a stable order."""

    def spares(self, cluster: ClusterRef) -> int | None:
        """How many more nodes `create` can make for the cluster from what it holds (ssh: the
        hosts listed beyond those claimed), for the controller's replace and grow; None where
        capacity is found by asking (clouds) or has no set bound (local)."""

    def terminate(self, cluster: ClusterRef, nodes: list[Node]) -> None:
        """Terminate nodes and return once the provider confirms they are gone. Where the
        provider does not own the machines, the engine has stopped the cluster's processes on
        them already: what is left is the provider's own (directories, claims)."""

    def cleanup(self, cluster: ClusterRef) -> None:
        """Delete cluster-wide cloud resources once no node remains; idempotent. Never the
        cluster's local key file: that is the engine's (mlcloud/remote/keys.py), kept across
        regions."""

    def transport(self, cluster: ClusterRef, node: Node, label: str, ssh: SshOptions) -> Transport:
        """How to run commands on and copy files to the node; label names it in messages."""

    def discover(self, region: str | None) -> list[Resource]:
        """Everything it holds for any cluster (in the region, where it has regions), found
        without local state, with owner and age if known: for `mlcloud gc` and `doctor`."""

    def delete(self, resources: list[Resource]) -> None:
        """Delete what discover() found, dependents first; return once they are gone."""

    def recorded(self, cluster: ClusterRef) -> ProvisionRequest | None:
        """What it keeps of the request the cluster was made with that the cluster's spec must
        hold again (ssh: the hosts and SSH settings), for `doctor --rebuild`; None where the
        resources' tags tell all."""

    def prices(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """On-demand USD per hour of (instance type, region) pairs, where the provider's own
        API tells; {} for a provider without prices (the catalog's figures serve)."""

    def quotes(self, pairs: list[tuple[str, str]], spot: bool) -> list[Quote]:
        """Today's prices of (instance type, region) pairs, Spot or on demand, read from the
        cloud's API now (for moves for price: mlcloud/spec/offers.py); [] for a provider
        without live prices. A cloud that cannot be asked raises a ProviderError."""


class MachinesAtHand:
    """Provider members for machines that already exist (local, ssh): no regions to choose
    and no cloud credentials to look for."""

    def default_region(self) -> str | None:
        return None

    def configured(self) -> bool:
        return True

    def placements(self, request: ProvisionRequest) -> list[tuple[str | None, str | None]]:
        return [(None, None)]
