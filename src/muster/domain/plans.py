"""What a deployment request may ask for: ECE's create and update bodies with container
resources, checked field by field before anything is written. Every refusal is an
InvalidInputError whose `fields` names the field (`resources.container[0].plan...`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from muster.errors import InvalidInputError

# Instance sizes: at least MIN_INSTANCE_MB, in steps of MEMORY_UNIT_MB (so that allocators fill
# without slivers too small for any instance), at most MAX_INSTANCE_MB.
MIN_INSTANCE_MB = 256
MEMORY_UNIT_MB = 128
MAX_INSTANCE_MB = 1024 * 1024
MAX_NAME = 128
MAX_RESOURCES = 16
MAX_TOPOLOGY_ELEMENTS = 8
MAX_ZONE_COUNT = 32
MAX_IMAGE = 512
MAX_COMMAND_ARGS = 128
MAX_ARG = 8192
MAX_ENV = 128
MAX_ENV_KEY = 128
MAX_ENV_VALUE = 8192
# Muster sets these in every instance: the address it listens on (docs: DESIGN "Runtime").
RESERVED_ENV = ("HOST", "PORT")
KIND = "container"

INVALID_REQUEST = "deployments.invalid_request"
INVALID_PLAN = "clusters.cluster_invalid_plan"

# The Docker image reference grammar (distribution/reference): [domain[:port]/]path[:tag][@digest]
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::{_TAG})?(?:@{_DIGEST})?"
)
_NAME_MAX = 255  # the grammar's limit on the name part
_REF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ResourceSpec:
    """One container resource as asked for: its plan normalised to
    {"cluster_topology": [{"zone_count", "size": {"resource", "value"}}],
     "container": {"image", "command", "env"}}."""

    ref_id: str
    region: str
    plan: dict[str, Any]

    @property
    def topology(self) -> list[tuple[int, int]]:
        """(zone_count, memory MB) of each topology element."""
        return [
            (element["zone_count"], element["size"]["value"])
            for element in self.plan["cluster_topology"]
        ]


def _refuse(field: str, message: str, *, code: str = INVALID_PLAN) -> InvalidInputError:
    return InvalidInputError(f"{field}: {message}", code=code, fields=[field])


def _object(value: Any, field: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _refuse(field, "must be an object")
    for key in value:
        if key not in known:
            raise _refuse(f"{field}.{str(key)[:64]}", f"unknown field; known: {', '.join(known)}")
    return value


def _text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _refuse(field, "must be a string")
    if len(value) > limit:
        raise _refuse(field, f"at most {limit} characters")
    if "\x00" in value:
        raise _refuse(field, "must not contain NUL")
    return value


def _whole(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(field, "must be a whole number")
    return value


def check_name(value: Any, field: str = "name") -> str:
    """A deployment name: 1..MAX_NAME printable characters."""
    name = _text(value, field, MAX_NAME)
    if not name.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise _refuse(field, "must be non-empty, without control characters", code=INVALID_REQUEST)
    return name


def check_image(value: Any, field: str) -> str:
    """A Docker image reference (`registry.example:5000/team/web:1.4`, `busybox@sha256:...`)."""
    image = _text(value, field, MAX_IMAGE)
    match = _REFERENCE.fullmatch(image)
    if match is None:
        raise _refuse(
            field,
            f"{image[:80]!r} is not a Docker image reference "
            "([registry[:port]/]name[:tag][@digest], name in lower case)",
        )
    if len(match.group("name")) > _NAME_MAX:
        raise _refuse(field, f"the image name is longer than {_NAME_MAX} characters")
    return image


def _size(value: Any, field: str) -> int:
    size = _object(value, field, ("resource", "value"))
    if size.get("resource", "memory") != "memory":
        raise _refuse(f"{field}.resource", 'must be "memory"')
    if "value" not in size:
        raise _refuse(f"{field}.value", "is required: the instance's memory in MB")
    mb = _whole(size["value"], f"{field}.value")
    if mb < MIN_INSTANCE_MB or mb > MAX_INSTANCE_MB or mb % MEMORY_UNIT_MB:
        raise _refuse(
            f"{field}.value",
            f"{mb} MB: an instance has {MIN_INSTANCE_MB} to {MAX_INSTANCE_MB} MB, "
            f"a multiple of {MEMORY_UNIT_MB} MB",
        )
    return mb


def _topology(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _refuse(field, "must be a non-empty list of topology elements")
    if len(value) > MAX_TOPOLOGY_ELEMENTS:
        raise _refuse(field, f"at most {MAX_TOPOLOGY_ELEMENTS} topology elements")
    elements = []
    for i, raw in enumerate(value):
        here = f"{field}[{i}]"
        element = _object(raw, here, ("zone_count", "size"))
        zones = _whole(element.get("zone_count", 1), f"{here}.zone_count")
        if not 1 <= zones <= MAX_ZONE_COUNT:
            raise _refuse(f"{here}.zone_count", f"must be 1 to {MAX_ZONE_COUNT}")
        if "size" not in element:
            raise _refuse(f"{here}.size", 'is required: {"resource": "memory", "value": MB}')
        mb = _size(element["size"], f"{here}.size")
        elements.append({"zone_count": zones, "size": {"resource": "memory", "value": mb}})
    return elements


def _container(value: Any, field: str) -> dict[str, Any]:
    container = _object(value, field, ("image", "command", "env"))
    if "image" not in container:
        raise _refuse(f"{field}.image", "is required")
    image = check_image(container["image"], f"{field}.image")
    command = container.get("command") or []
    if not isinstance(command, list):
        raise _refuse(f"{field}.command", "must be a list of strings")
    if len(command) > MAX_COMMAND_ARGS:
        raise _refuse(f"{field}.command", f"at most {MAX_COMMAND_ARGS} arguments")
    args = [_text(arg, f"{field}.command[{i}]", MAX_ARG) for i, arg in enumerate(command)]
    env = container.get("env") or {}
    if not isinstance(env, Mapping):
        raise _refuse(f"{field}.env", "must be an object of strings")
    if len(env) > MAX_ENV:
        raise _refuse(f"{field}.env", f"at most {MAX_ENV} variables")
    checked: dict[str, str] = {}
    for key, val in env.items():
        name = _text(key, f"{field}.env", MAX_ENV_KEY)
        if not _ENV_KEY.fullmatch(name):
            raise _refuse(
                f"{field}.env", f"{name[:64]!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
            )
        if name in RESERVED_ENV:
            raise _refuse(f"{field}.env.{name}", "is set by Muster: the instance's own address")
        checked[name] = _text(val, f"{field}.env.{name}", MAX_ENV_VALUE)
    return {"image": image, "command": args, "env": checked}


def check_plan(value: Any, field: str) -> dict[str, Any]:
    """A container plan, normalised. Raises InvalidInputError naming the first bad field."""
    plan = _object(value, field, ("cluster_topology", "container"))
    if "container" not in plan:
        raise _refuse(f"{field}.container", "is required: the image to run")
    return {
        "cluster_topology": _topology(plan.get("cluster_topology"), f"{field}.cluster_topology"),
        "container": _container(plan["container"], f"{field}.container"),
    }


def check_resources(value: Any, region: str, field: str = "resources") -> list[ResourceSpec]:
    """The container resources of a create or update body. Raises InvalidInputError for
    another resource kind, a bad or repeated ref_id, another region, or a bad plan."""
    if not isinstance(value, Mapping):
        raise _refuse(field, 'must be an object: {"container": [...]}', code=INVALID_REQUEST)
    for kind, entries in value.items():
        if kind != KIND and entries:
            raise _refuse(
                f"{field}.{str(kind)[:64]}",
                "Muster runs container resources only",
                code=INVALID_REQUEST,
            )
    entries = value.get(KIND) or []
    if not isinstance(entries, list):
        raise _refuse(f"{field}.{KIND}", "must be a list", code=INVALID_REQUEST)
    if len(entries) > MAX_RESOURCES:
        raise _refuse(f"{field}.{KIND}", f"at most {MAX_RESOURCES} resources")
    specs: list[ResourceSpec] = []
    for i, raw in enumerate(entries):
        here = f"{field}.{KIND}[{i}]"
        entry = _object(raw, here, ("ref_id", "region", "plan", "display_name"))
        ref_id = _text(entry.get("ref_id", f"main-{KIND}"), f"{here}.ref_id", 64)
        if not _REF_ID.fullmatch(ref_id):
            raise _refuse(f"{here}.ref_id", "letters, digits, '-' and '_', up to 64")
        if any(spec.ref_id == ref_id for spec in specs):
            raise _refuse(f"{here}.ref_id", f"{ref_id!r} is given twice")
        given = _text(entry.get("region", region), f"{here}.region", 64)
        if given != region:
            raise _refuse(f"{here}.region", f"{given[:64]!r} is not this platform's {region!r}")
        if "plan" not in entry:
            raise _refuse(f"{here}.plan", "is required")
        specs.append(ResourceSpec(ref_id, region, check_plan(entry["plan"], f"{here}.plan")))
    return specs


def check_create(body: Any, region: str) -> tuple[str | None, list[ResourceSpec]]:
    """(name or None, resources) of ECE's DeploymentCreateRequest. Raises InvalidInputError."""
    if not isinstance(body, Mapping):
        raise _refuse("body", "must be an object", code=INVALID_REQUEST)
    name = None if body.get("name") is None else check_name(body["name"])
    specs = check_resources(body.get("resources"), region)
    if not specs:
        raise _refuse(f"resources.{KIND}", "at least one resource", code=INVALID_REQUEST)
    return name, specs


def check_update(body: Any, region: str) -> tuple[str | None, list[ResourceSpec] | None, bool]:
    """(new name or None, resources with a new plan or None when `resources` is absent,
    prune_orphans) of ECE's DeploymentUpdateRequest. Raises InvalidInputError."""
    if not isinstance(body, Mapping):
        raise _refuse("body", "must be an object", code=INVALID_REQUEST)
    name = None if body.get("name") is None else check_name(body["name"])
    prune = body.get("prune_orphans", False)
    if not isinstance(prune, bool):
        raise _refuse("prune_orphans", "must be true or false", code=INVALID_REQUEST)
    resources = body.get("resources")
    return name, None if resources is None else check_resources(resources, region), prune
