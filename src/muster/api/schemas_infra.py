"""Wire models of ECE's platform infrastructure API (allocators, runners), field names as in
ECE's apidocs.json. Replies allow Muster's extra fields; requests are strict (a wrong JSON type
is a 400, never coerced)."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from muster.api.schemas import Reply, Strict, _is_storable
from muster.errors import InvalidInputError

INT32_MAX = 2**31 - 1
MAX_PAGE = 10_000


_AS_IS = TypeAdapter(Any)


def reply_json(value: Any) -> bytes:
    """A reply the domain built (`muster.domain.documents`: no nulls, keys in the order of its
    wire model's fields) serialised as FastAPI serialises that `response_model` with
    `response_model_exclude_none`, byte for byte, but without validating it again: validating a
    10,000-allocator listing costs half a second. Listing routes return these bytes."""
    return _AS_IS.dump_json(value)


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


class AllocatorSettingsRequest(Strict):
    """ECE's AllocatorSettings: `capacity` is checked, other fields are kept as given (ECE's
    schema does not forbid them)."""

    capacity: int | None = Field(
        default=None, description="Memory capacity (MB) overriding the installed one; null: none"
    )

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="after")
    def _storable_extras(self) -> AllocatorSettingsRequest:
        if not _is_storable(self.model_extra or {}):
            raise ValueError("text must be valid Unicode without NUL characters")
        return self

    def fields_given(self) -> dict[str, Any]:
        """The fields the body names, nulls included (a merge patch removes those)."""
        given = self.model_dump(include=self.model_fields_set)
        return {**given, **(self.model_extra or {})}


def settings_patch(body: AllocatorSettingsRequest | str) -> AllocatorSettingsRequest:
    """The PATCH body: a JSON object, or (as ECE's spec types it `string`, and ECE's Go SDK
    sends it) a string holding that JSON object. Raises InvalidInputError."""
    if not isinstance(body, str):
        return body
    try:
        return AllocatorSettingsRequest.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "body"
        raise InvalidInputError(
            f"{where}: {error['msg']}; send the settings as a JSON object (or a string "
            "holding one)",
            code="allocators.invalid_input",
            fields=[where],
        ) from None


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


# -- resync ----------------------------------------------------------------------------------------
class IndexSynchronizationResults(Reply):
    created: list[str]
    updated: list[str]
    deleted: list[str]
    errors: list[str]


class ModelVersionIndexSynchronizationResults(Reply):
    results: dict[str, IndexSynchronizationResults]


# -- platform --------------------------------------------------------------------------------------
class ZookeeperNodeInfo(Reply):
    id: str
    state: str


class ZookeeperSummary(Reply):
    states: list[ZookeeperNodeInfo]


class AllocatorsZoneSummary(Reply):
    zone_id: str
    total_allocators: int
    healthy_allocators: int
    connected_allocators: int
    disconnected_allocators: int
    in_maintenance_allocators: int
    connected_capacity: int
    max_available_capacity: int
    instances: int


class AllocatorsSummary(Reply):
    healthy: bool
    zone_summaries: list[AllocatorsZoneSummary]


class RunnersSummary(Reply):
    healthy: bool
    total_runners: int
    healthy_runners: int
    connected_runners: int
    connected_capacity: int
    max_available_capacity: int
    containers_count: int


class ProxySummary(Reply):
    proxy_id: str
    healthy: bool


class ProxiesSummary(Reply):
    healthy: bool
    expected_proxies_count: int
    proxies_count: int
    proxies: list[ProxySummary]


class ContainerSetSummary(Reply):
    container_set_id: str
    healthy: bool
    hidden: bool
    containers_created_count: int
    containers_started_count: int
    containers_running_count: int
    containers_expected_running_count: int


class ContainerSetsSummary(Reply):
    healthy: bool
    healthy_container_sets_count: int
    unhealthy_container_sets_count: int
    unhealthy_container_sets: list[ContainerSetSummary]


class ConstructorHealthStatus(Reply):
    connected: bool
    maintenance_mode: bool


class ConstructorInfo(Reply):
    constructor_id: str
    status: ConstructorHealthStatus


class ConstructorOverview(Reply):
    constructors: list[ConstructorInfo]


class CoordinatorSummary(Reply):
    name: str
    public_hostname: str
    leader_port: int
    election_port: int
    client_port: int
    attributes: dict[str, str]
    runner_id: str | None = Field(default=None, description="Muster: the coordinator's runner")
    host_ip: str | None = Field(default=None, description="Muster: its host's IP")
    zone: str | None = Field(default=None, description="Muster: its host's zone")
    connected: bool | None = Field(default=None, description="Muster: heartbeats arrive")
    healthy: bool | None = Field(default=None, description="Muster: connected, host healthy")
    last_heartbeat: str | None = Field(default=None, description="Muster: newest heartbeat")


class CoordinatorsSummary(Reply):
    coordinators: list[CoordinatorSummary]


class PlatformResourcesSummary(Reply):
    healthy: bool
    available_count: int
    used_count: int
    missing_count: int
    minimum_available_count: int
    account_count: int


class RegionInfo(Reply):
    region_id: str
    zookeeper_states: ZookeeperSummary
    allocators: AllocatorsSummary
    runners: RunnersSummary
    proxies: ProxiesSummary
    container_sets_status: ContainerSetsSummary
    constructors: ConstructorOverview
    coordinators: CoordinatorsSummary
    resources: PlatformResourcesSummary


class PlatformServiceImageInfo(Reply):
    id: str
    tag: str
    version: str
    hash: str


class PlatformServiceInfo(Reply):
    type: str
    image: list[PlatformServiceImageInfo]


class UnreachableRegionInfo(Reply):
    region_id: str


class PlatformInfo(Reply):
    version: str
    services: list[PlatformServiceInfo]
    phone_home_enabled: bool
    eula_accepted: bool
    regions: list[RegionInfo]
    unreachable_regions: list[UnreachableRegionInfo]
