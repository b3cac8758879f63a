"""Wire models of ECE's platform infrastructure API (allocators, runners), field names as in
ECE's apidocs.json. Replies allow Muster's extra fields; requests are strict (a wrong JSON type
is a 400, never coerced)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from muster.api.schemas import Reply, Strict

INT32_MAX = 2**31 - 1
MAX_PAGE = 10_000


_AS_IS = TypeAdapter(Any)


def reply_json(value: Any) -> bytes:
    """A reply the domain built (`muster.domain.documents`: no nulls, keys in the order of its
    wire model's fields) serialised as FastAPI serialises that `response_model` with
    `response_model_exclude_none`, byte for byte, but without validating it again: validating a
    10,000-allocator listing costs half a second. Listing routes return these bytes."""
    return _AS_IS.dump_json(value)


class StrictForbid(BaseModel):
    """A request whose unknown fields are refused: they would otherwise be silently dropped."""

    model_config = ConfigDict(strict=True, extra="forbid")


# -- shared --------------------------------------------------------------------------------------
class MetadataItem(Reply):
    key: str
    value: str


class MetadataItemRequest(Strict):
    key: str = Field(max_length=1024)
    value: str = Field(max_length=4096)


class MetadataItems(Strict):
    items: list[MetadataItemRequest] = Field(max_length=1000)


class MetadataItemValue(Strict):
    value: str = Field(max_length=4096)


class SearchRequest(Strict):
    """ECE's SearchRequest: `query` is a QueryContainer, checked by muster.domain.query."""

    from_: int | None = Field(default=None, alias="from", ge=0, le=INT32_MAX)
    size: int | None = Field(default=None, ge=0, le=MAX_PAGE)
    query: dict[str, Any] | None = None
    sort: list[Any] | None = Field(default=None, max_length=32)
    cursor: str | None = None

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    def as_body(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


# -- allocators ----------------------------------------------------------------------------------
class AllocatorCapacityMemory(Reply):
    total: int
    used: int


class AllocatorCapacityStorage(Reply):
    total: int


class AllocatorCapacity(Reply):
    memory: AllocatorCapacityMemory
    storage: AllocatorCapacityStorage
    available_cpus: int | None = None
    additional_master_bonus: float | None = None


class AllocatorHealthChecks(Reply):
    is_docker_healthy: bool
    is_connected_to_zk: bool
    has_instances: bool


class AllocatorHealthStatus(Reply):
    connected: bool
    healthy: bool
    health_checks: AllocatorHealthChecks | None = None
    maintenance_mode: bool
    maintenance_mode_timestamp: str | None = None


class AllocatorSettings(Reply):
    capacity: int | None = Field(default=None, description="Memory capacity override in MB")


class AllocatorSettingsRequest(StrictForbid):
    capacity: int | None = Field(
        default=None, description="Memory capacity (MB) overriding the installed one; null: none"
    )


class AllocatorSettingsPatch(AllocatorSettingsRequest):
    """PATCH body: a JSON object, or (as ECE's spec declares the body `type: string`, and
    generated clients send it) a JSON string holding that object."""

    @model_validator(mode="before")
    @classmethod
    def _decode_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            try:
                return json.loads(data)
            except (ValueError, RecursionError):  # RecursionError: nested too deep
                raise ValueError("the settings string is not JSON; send a JSON object") from None
        return data


class AllocatedInstanceStatus(Reply):
    cluster_type: str
    cluster_id: str
    instance_name: str
    node_memory: int


class AllocatorBuildInfo(Reply):
    commit_hash: str | None = None
    version: str | None = None


class ExternalHyperlink(Reply):
    id: str
    label: str
    uri: str | None = None


class AllocatorInfo(Reply):
    status: AllocatorHealthStatus
    allocator_id: str
    zone_id: str
    host_ip: str
    public_hostname: str
    capacity: AllocatorCapacity
    settings: AllocatorSettings
    instances: list[AllocatedInstanceStatus]
    metadata: list[MetadataItem]
    build_info: AllocatorBuildInfo | None = None
    features: list[str]
    external_links: list[ExternalHyperlink]
    region: str | None = None
    last_heartbeat: str | None = Field(default=None, description="Muster: newest heartbeat")


class AllocatorZoneInfo(Reply):
    zone_id: str
    allocators: list[AllocatorInfo]


class AllocatorOverview(Reply):
    zones: list[AllocatorZoneInfo]


# -- runners -------------------------------------------------------------------------------------
class RunnerRoleInfo(Reply):
    role_name: str


class RunnerRolesInfo(Reply):
    roles: list[RunnerRoleInfo]


class RunnerRoleInfoRequest(Strict):
    role_name: str = Field(max_length=64)


class RunnerRolesInfoRequest(Strict):
    roles: list[RunnerRoleInfoRequest] = Field(max_length=16)


class RunnerContainerInfo(Reply):
    container_name: str
    container_set_name: str


class RunnerBuildInfo(Reply):
    commit_hash: str | None = None
    version: str | None = None


class RunnerHealthChecks(Reply):
    is_docker_healthy: bool
    is_connected_to_zk: bool
    has_containers: bool


class RunnerCapacity(Reply):
    """Muster: what the host reports about itself."""

    memory_mb: int
    storage_mib: int
    cpus: int


class RunnerInfo(Reply):
    runner_id: str
    runner_name: str | None = None
    zone: str | None = None
    tags: dict[str, str] | None = None
    features: dict[str, bool] | None = None
    build_info: RunnerBuildInfo | None = None
    host_ip: str
    public_hostname: str
    containers: list[RunnerContainerInfo]
    roles: list[RunnerRoleInfo]
    connected: bool
    healthy: bool
    health_checks: RunnerHealthChecks | None = None
    region: str | None = None
    zone_id: str | None = Field(default=None, description="Muster: the runner's zone")
    last_heartbeat: str | None = Field(default=None, description="Muster: newest heartbeat")
    joined: str | None = Field(default=None, description="Muster: when the host joined")
    capacity: RunnerCapacity | None = None


class RunnerOverview(Reply):
    runners: list[RunnerInfo]
