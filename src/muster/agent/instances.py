"""What an allocator host is asked to run and what it reports back: InstanceSpec, InstanceState,
and how an instance is named and labelled on the Docker Engine."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from muster.errors import InvalidInputError

# Labels on every container Muster creates. The runner label says whose it is: a runtime only
# ever touches containers that carry its own runner id, so images started by hand, or by another
# runner sharing the engine, are left alone.
LABEL_RUNNER = "io.muster.runner"
LABEL_DEPLOYMENT = "io.muster.deployment"
LABEL_RESOURCE = "io.muster.resource"
LABEL_INSTANCE = "io.muster.instance"
LABEL_PLAN_VERSION = "io.muster.plan-version"
LABEL_MEMORY_MB = "io.muster.memory-mb"

# Ids become parts of a container name ("muster.<deployment>.<resource>.<instance>"): no dots,
# so that two different instances can never map to one name.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

InstanceKey = tuple[str, str, str]  # (deployment id, resource id, instance name)


@dataclass(frozen=True)
class InstanceSpec:
    """One instance this host should run, as the coordinator's plan placed it.

    `plan_version` grows with every plan of the resource and names its content: a container of
    an older version is replaced, a desired version older than the running one is refused (see
    Runtime), and within one version the image, command and environment are taken as unchanged.
    The container gets `env` plus HOST=host_ip and PORT=port, and listens there.
    Raises InvalidInputError on an id that cannot name a container, or a bad size, address, port.
    """

    deployment_id: str
    resource_id: str
    instance_name: str
    plan_version: int
    image: str
    memory_mb: int
    host_ip: str
    port: int
    command: list[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("deployment_id", "resource_id", "instance_name"):
            if not _ID.match(getattr(self, name)):
                raise InvalidInputError(
                    f"{name} {getattr(self, name)!r} must be 1-64 letters, digits, '_' or '-'",
                    fields=[name],
                )
        if self.plan_version < 0:
            raise InvalidInputError("plan_version must not be negative", fields=["plan_version"])
        if not self.image:
            raise InvalidInputError("image must not be empty", fields=["image"])
        if self.memory_mb <= 0:
            raise InvalidInputError("memory_mb must be positive", fields=["memory_mb"])
        if not 1 <= self.port <= 65535:
            raise InvalidInputError("port must be in 1-65535", fields=["port"])
        try:
            ipaddress.ip_address(self.host_ip)
        except ValueError:
            raise InvalidInputError(
                f"host_ip {self.host_ip!r} is not an IP address", fields=["host_ip"]
            ) from None

    @property
    def key(self) -> InstanceKey:
        return (self.deployment_id, self.resource_id, self.instance_name)

    @property
    def container_name(self) -> str:
        return container_name(self.key)

    def environment(self) -> dict[str, str]:
        """The container's environment: the plan's, with Muster's HOST and PORT winning."""
        return {**self.env, "HOST": self.host_ip, "PORT": str(self.port)}

    def labels(self, runner_id: str) -> dict[str, str]:
        return {
            LABEL_RUNNER: runner_id,
            LABEL_DEPLOYMENT: self.deployment_id,
            LABEL_RESOURCE: self.resource_id,
            LABEL_INSTANCE: self.instance_name,
            LABEL_PLAN_VERSION: str(self.plan_version),
            LABEL_MEMORY_MB: str(self.memory_mb),
        }


@dataclass(frozen=True)
class InstanceState:
    """What the host reports for one desired instance (ECE's ClusterInstanceInfo, later).

    `plan_version` and `memory_mb` are those of the container actually kept, which differ from
    the desired ones only when an older plan was refused. `restarts` counts restarts by this
    runtime object (it starts from 0 after an agent restart). `last_error` is short text, or None.
    """

    deployment_id: str
    resource_id: str
    instance_name: str
    plan_version: int
    memory_mb: int
    container_started: bool
    service_running: bool
    restarts: int
    last_error: str | None
    container_id: str | None


def container_name(key: InstanceKey) -> str:
    """The deterministic container name of an instance: a restarted agent finds it again, and the
    engine refuses a second container of the same name."""
    return "muster." + ".".join(key)


def key_from_labels(labels: Mapping[str, str]) -> InstanceKey | None:
    """The instance a container's labels name, or None when they do not name one."""
    try:
        return (labels[LABEL_DEPLOYMENT], labels[LABEL_RESOURCE], labels[LABEL_INSTANCE])
    except KeyError:
        return None


def int_label(labels: Mapping[str, str], name: str) -> int:
    """An integer label; -1 when missing or malformed (an unreadable plan version is older than
    any plan, so such a container gets replaced)."""
    try:
        return int(labels[name])
    except (KeyError, ValueError):
        return -1
