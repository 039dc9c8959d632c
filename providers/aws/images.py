"""Machine images: the newest Ubuntu Deep Learning AMI with PyTorch by default, the user's
own otherwise, and the user each logs in as. The choice is pinned at `prepare`, so every node
of a cluster (and a resumed `up`) gets the same image."""

from __future__ import annotations

import re
from dataclasses import replace

from mlcloud.providers.aws.api import Api
from mlcloud.providers.base import ProviderError, ProvisionRequest

from mlcloud.errors import UsageError

DEFAULT_USER = "ubuntu"  # the Ubuntu DLAMI's, and so of clusters recorded before it was pinned
# The Ubuntu builds only: the Amazon Linux 2023 ones share the prefix and log in as ec2-user.
# Newest first by CreationDate; the OSS-driver PyTorch DLAMI is the one AWS maintains today.
DLAMI_NAMES = [
    "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu *",
    "Deep Learning AMI GPU PyTorch * (Ubuntu *",
]
_DLAMI_UBUNTU = re.compile(r"\(Ubuntu \d+\.\d+\)")
# The login user of an image family, told by its name or description: first match wins.
LOGIN_USERS = [
    (re.compile(r"ubuntu", re.I), "ubuntu"),
    (re.compile(r"amazon linux|amzn|\bal2(023)?\b", re.I), "ec2-user"),
    (re.compile(r"debian", re.I), "admin"),
    (re.compile(r"\brhel\b|red hat|suse|\bsles\b|almalinux", re.I), "ec2-user"),
    (re.compile(r"centos", re.I), "centos"),
    (re.compile(r"rocky", re.I), "rocky"),
    (re.compile(r"fedora", re.I), "fedora"),
]


class Images:
    """DescribeImages, with each image's root device remembered for the launch."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self._roots: dict[tuple[str, str], str] = {}  # (region, image) -> root device name

    def image(self, region: str, image: str | None) -> tuple[str, str]:
        """(image id, root device name): the one asked for (or pinned), else the newest DLAMI."""
        if not image:
            image = self.pin(region, ProvisionRequest(count=1)).image
        assert image is not None
        if (region, image) not in self._roots:
            self._describe(region, image)
        return image, self._roots[(region, image)]

    def pin(self, region: str, request: ProvisionRequest) -> ProvisionRequest:
        """The request with its image and login user decided: the newest Ubuntu DLAMI (user
        ubuntu), or the asked image with ssh.user, else the user its name implies."""
        if not request.image:
            newest = self._newest(region)
            self._roots[(region, newest["ImageId"])] = newest.get("RootDeviceName") or "/dev/sda1"
            user = request.ssh.user or DEFAULT_USER
            return replace(request, image=newest["ImageId"], ssh=replace(request.ssh, user=user))
        if request.ssh.user:
            return request
        found = self._describe(region, request.image)
        user = login_user(found.get("Name", ""), found.get("Description", ""))
        if user is None:
            raise UsageError(
                f"image {request.image} ({found.get('Name') or 'no name'}): cannot tell its login "
                "user; set ssh.user in the spec or pass --ssh-user"
            )
        return replace(request, ssh=replace(request.ssh, user=user))

    def _describe(self, region: str, image: str) -> dict:
        try:
            images = self.api.call(region, "describe_images", ImageIds=[image])["Images"]
        except ProviderError as e:
            if "InvalidAMIID" not in str(e):
                raise
            images = []
        if not images:
            raise UsageError(f"image {image} not found in {region}; check image: (or --image)")
        self._roots[(region, image)] = images[0].get("RootDeviceName") or "/dev/sda1"
        return images[0]

    def _newest(self, region: str) -> dict:
        images = self.api.call(
            region,
            "describe_images",
            Owners=["amazon"],
            Filters=[
                {"Name": "name", "Values": DLAMI_NAMES},
                {"Name": "state", "Values": ["available"]},
                {"Name": "architecture", "Values": ["x86_64"]},
            ],
        )["Images"]
        images = [i for i in images if _DLAMI_UBUNTU.search(i.get("Name", ""))]
        if not images:
            raise ProviderError(
                f"no AWS Deep Learning AMI with PyTorch on Ubuntu found in {region}; "
                "set image: in the spec to an AMI id"
            )
        return max(images, key=lambda i: i.get("CreationDate", ""))


def login_user(name: str, description: str = "") -> str | None:
    """The user an image logs in as, told by its name (then description); None if unknown."""
    for text in (name, description):
        for pattern, user in LOGIN_USERS:
            if pattern.search(text or ""):
                return user
    return None
