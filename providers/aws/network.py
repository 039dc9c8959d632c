"""A cluster's EC2 network resources: its key pair, its security group (SSH from the caller,
everything within the group) and, for several nodes, its cluster placement group. Each carries
the cluster's tags, so `cleanup` and `gc` find them again."""

from __future__ import annotations

import ipaddress
import time

from mlcloud.providers import caller
from mlcloud.providers.aws.api import ANY_CLUSTER, Api, Unsupported, by_cluster, tagged
from mlcloud.providers.base import ClusterRef, ProviderError, Resource, SshOptions


class Network:
    """The calls, with what this process made or found (group ids, placement groups)."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self._groups: dict[tuple[str, str], str] = {}  # (region, cluster uid) -> group id
        self._placement: dict[tuple[str, str], str] = {}  # (region, cluster uid) -> group name

    def key_pair(self, cluster: ClusterRef, region: str, ssh: SshOptions) -> None:
        """Import the cluster's public key (the user's identity file's, else the cluster key)."""
        from mlcloud.remote import keys

        name = f"mlcloud-{cluster.uid}"
        if self.api.call(region, "describe_key_pairs", Filters=by_cluster(cluster)).get("KeyPairs"):
            return
        if ssh.identity_file:
            public = caller.public_key(ssh.identity_file)
        else:
            _, public = keys.ensure_cluster_key(cluster.uid)
        self.api.call(
            region,
            "import_key_pair",
            KeyName=name,
            PublicKeyMaterial=public.encode(),
            TagSpecifications=[{"ResourceType": "key-pair", "Tags": self.api.tags(cluster, name)}],
        )

    def group_id(self, cluster: ClusterRef, region: str) -> str:
        """The cluster's security group, as prepared here or found by tag."""
        found = self._groups.get((region, cluster.uid)) or self._find_group(cluster, region)
        if not found:
            raise ProviderError(f"security group of {cluster.name} not found in {region}")
        return found

    def _find_group(self, cluster: ClusterRef, region: str) -> str | None:
        groups = self.api.call(region, "describe_security_groups", Filters=by_cluster(cluster))[
            "SecurityGroups"
        ]
        return groups[0]["GroupId"] if groups else None

    def security_group(self, cluster: ClusterRef, region: str, ssh: SshOptions) -> None:
        """The cluster's group with SSH from the allowed addresses and everything within the
        group. Creating a group and adding its rules are two calls, so a group found again
        (a resumed `up`) gets whatever rule it lacks: one a crash left out, or the caller's
        new address. Rules are only ever added, never removed: some may be the user's own."""
        groups = self.api.call(region, "describe_security_groups", Filters=by_cluster(cluster))[
            "SecurityGroups"
        ]
        if groups:
            sg, permissions = groups[0]["GroupId"], groups[0].get("IpPermissions", [])
        else:
            sg, permissions = self.create_security_group(cluster, region), []
        self._groups[(region, cluster.uid)] = sg
        cidrs = list(ssh.allowed_cidrs) or [caller.cidr(self.api.client(region).meta.endpoint_url)]
        missing = missing_rules(sg, permissions, cidrs)
        if not missing:
            return
        try:
            self.api.call(
                region, "authorize_security_group_ingress", GroupId=sg, IpPermissions=missing
            )
        except ProviderError as e:
            if "InvalidPermission.Duplicate" not in str(e):  # another `up` added it first
                raise

    def create_security_group(self, cluster: ClusterRef, region: str) -> str:
        name = f"mlcloud-{cluster.uid}"
        vpcs = self.api.call(
            region, "describe_vpcs", Filters=[{"Name": "isDefault", "Values": ["true"]}]
        )["Vpcs"]
        if not vpcs:
            raise ProviderError(
                f"no default VPC in {region}; create one "
                "(`aws ec2 create-default-vpc`) or pick another region"
            )
        return self.api.call(
            region,
            "create_security_group",
            GroupName=name,
            Description=f"mlcloud cluster {cluster.name}: SSH from the caller, "
            "all traffic within the cluster",
            VpcId=vpcs[0]["VpcId"],
            TagSpecifications=[
                {"ResourceType": "security-group", "Tags": self.api.tags(cluster, name)}
            ],
        )["GroupId"]

    def placement_group(self, cluster: ClusterRef, region: str) -> str | None:
        """Make the cluster's placement group (nodes close together, for NCCL); where the
        endpoint has none or refuses to make one, the nodes go without: the warning says so."""
        name = f"mlcloud-{cluster.uid}"
        try:
            if not self._placement_groups(region, by_cluster(cluster), strict=True):
                self.api.call(
                    region,
                    "create_placement_group",
                    GroupName=name,
                    Strategy="cluster",
                    TagSpecifications=[
                        {"ResourceType": "placement-group", "Tags": self.api.tags(cluster, name)}
                    ],
                )
        except Unsupported:
            return (
                f"no cluster placement group in {region}: the endpoint does not implement "
                "them; the nodes go without one"
            )
        except ProviderError as e:  # not allowed to, or a limit: still worth the nodes
            return f"no cluster placement group in {region} ({e}); the nodes go without one"
        self._placement[(region, cluster.uid)] = name
        return None

    def placement_of(self, cluster: ClusterRef, region: str) -> str | None:
        """The placement group prepared for the cluster here, if one was."""
        return self._placement.get((region, cluster.uid))

    def delete(self, cluster: ClusterRef, region: str) -> None:
        """The cluster's group, key pair and placement group, once no instance uses them."""
        sg = self._find_group(cluster, region)
        if sg:
            self._delete_with_retry(region, "delete_security_group", GroupId=sg)
        for kp in self.api.call(region, "describe_key_pairs", Filters=by_cluster(cluster)).get(
            "KeyPairs", []
        ):
            self.api.call(region, "delete_key_pair", KeyName=kp["KeyName"])
        for pg in self._placement_groups(region, by_cluster(cluster)):
            self.api.call(region, "delete_placement_group", GroupName=pg["GroupName"])

    def discover(self, region: str) -> list[Resource]:
        """Every cluster's security groups, key pairs and placement groups in the region."""
        found = [
            tagged("security-group", g["GroupId"], g.get("Tags"), region)
            for g in self.api.call(region, "describe_security_groups", Filters=ANY_CLUSTER)[
                "SecurityGroups"
            ]
        ]
        for k in self.api.call(region, "describe_key_pairs", Filters=ANY_CLUSTER).get(
            "KeyPairs", []
        ):
            found.append(
                tagged("key-pair", k["KeyName"], k.get("Tags"), region, k.get("CreateTime"))
            )
        for p in self._placement_groups(region, ANY_CLUSTER):
            found.append(tagged("placement-group", p["GroupName"], p.get("Tags"), region))
        return found

    def delete_found(self, region: str, resources: list[Resource]) -> None:
        """Delete what discover() found (once the instances that used it are gone)."""
        for r in resources:
            if r.kind == "security-group":
                self._delete_with_retry(region, "delete_security_group", GroupId=r.id)
            elif r.kind == "key-pair":
                self.api.call(region, "delete_key_pair", KeyName=r.id)
            elif r.kind == "placement-group":
                self.api.call(region, "delete_placement_group", GroupName=r.id)

    def _placement_groups(self, region: str, filters: list[dict], strict: bool = False) -> list:
        """Tagged placement groups; none where the endpoint lacks them (unless strict)."""
        try:
            return self.api.call(region, "describe_placement_groups", Filters=filters).get(
                "PlacementGroups", []
            )
        except Unsupported:
            if strict:
                raise
            return []

    def _delete_with_retry(self, region: str, op: str, **kwargs) -> None:
        """A group still referenced by terminating instances answers DependencyViolation."""
        deadline = time.monotonic() + 120
        while True:
            try:
                self.api.call(region, op, **kwargs)
                return
            except ProviderError as e:
                if "DependencyViolation" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(5)


def missing_rules(group_id: str, permissions: list[dict], cidrs: list[str]) -> list[dict]:
    """The ingress rules to add so SSH is open to `cidrs` and all traffic within the group,
    given the group's present rules (a CIDR inside a wider rule already is covered)."""

    def covers(p: dict, port: int | None) -> bool:
        if p.get("IpProtocol") == "-1":
            return True
        return (
            port is not None
            and p.get("IpProtocol") == "tcp"
            and p.get("FromPort", -1) <= port <= p.get("ToPort", -1)
        )

    present = [
        ipaddress.ip_network(r[key], strict=False)
        for p in permissions
        if covers(p, 22)
        for ranges, key in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6"))
        for r in p.get(ranges, [])
    ]
    need = []
    for c in cidrs:
        net = ipaddress.ip_network(c, strict=False)
        if not any(net.version == have.version and net.subnet_of(have) for have in present):
            need.append(net)
    rules = []
    v4 = [str(n) for n in need if n.version == 4]
    v6 = [str(n) for n in need if n.version == 6]
    if v4 or v6:
        what = "mlcloud: SSH from the caller"
        rules.append(
            {
                "IpProtocol": "tcp",
                "FromPort": 22,
                "ToPort": 22,
                **({"IpRanges": [{"CidrIp": c, "Description": what} for c in v4]} if v4 else {}),
                **(
                    {"Ipv6Ranges": [{"CidrIpv6": c, "Description": what} for c in v6]} if v6 else {}
                ),
            }
        )
    within = any(
        p.get("IpProtocol") == "-1"
        and any(g.get("GroupId") == group_id for g in p.get("UserIdGroupPairs", []))
        for p in permissions
    )
    if not within:
        rules.append(
            {
                "IpProtocol": "-1",
                "UserIdGroupPairs": [
                    {
                        "GroupId": group_id,
                        "Description": "mlcloud: within the cluster (NCCL, rendezvous)",
                    }
                ],
            }
        )
    return rules
