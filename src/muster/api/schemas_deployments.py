"""Wire models of ECE's deployments API with Muster's container resources: the create and update
bodies (checked further, field by field, in `muster.domain.plans`) and the replies."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field

from muster.api.schemas import Reply, Strict

OtherPayloads = list[dict[str, Any]] | None  # ECE's other kinds: refused by the domain


class Exact(Strict):
    """A part of a plan: an unknown field is a 400 naming it, not silently dropped."""

    model_config = ConfigDict(strict=True, extra="forbid")


# -- requests ----------------------------------------------------------------------------------
class TopologySize(Exact):
    resource: str = Field("memory", description='Always "memory"')
    value: int = Field(description="The instance's memory in MB: 256 or more, in 128 MB steps")


class ContainerTopologyElement(Exact):
    zone_count: int = Field(1, description="How many zones: one instance in each")
    size: TopologySize


class ContainerConfiguration(Exact):
    image: str = Field(
        description="A Docker image reference: [registry[:port]/]name[:tag][@digest]"
    )
    command: list[str] | None = Field(None, description="The command, as a list of arguments")
    env: dict[str, str] | None = Field(
        None, description="Environment variables; Muster sets HOST and PORT itself"
    )


class ContainerPlan(Exact):
    cluster_topology: list[ContainerTopologyElement]
    container: ContainerConfiguration


class ContainerPayload(Strict):
    ref_id: str
    region: str | None = Field(None, description="The platform's region (the default)")
    display_name: str | None = None
    plan: ContainerPlan


class DeploymentCreateResources(Strict):
    container: list[ContainerPayload] | None = None
    elasticsearch: OtherPayloads = None
    kibana: OtherPayloads = None
    apm: OtherPayloads = None
    appsearch: OtherPayloads = None
    enterprise_search: OtherPayloads = None
    integrations_server: OtherPayloads = None


class DeploymentCreateRequest(Strict):
    name: str | None = None
    resources: DeploymentCreateResources | None = None


class DeploymentUpdateRequest(Strict):
    name: str | None = None
    prune_orphans: bool = Field(
        False, description="Remove the resources this request leaves out (ECE requires it)"
    )
    resources: DeploymentCreateResources | None = None


# -- replies -------------------------------------------------------------------------------------
class DeploymentResource(Reply):
    ref_id: str
    id: str
    kind: str
    region: str


class DeploymentCreateResponse(Reply):
    id: str
    name: str
    created: bool
    resources: list[DeploymentResource]


class DeploymentsListingData(Reply):
    id: str
    name: str
    resources: list[DeploymentResource]


class DeploymentsListResponse(Reply):
    deployments: list[DeploymentsListingData]


class DeploymentUpdateResponse(Reply):
    id: str
    name: str
    resources: list[DeploymentResource]


class DeploymentShutdownResponse(Reply):
    id: str
    name: str


class DeploymentDeleteResponse(Reply):
    id: str
    name: str


class ClusterInstanceMemoryInfo(Reply):
    instance_capacity: int


class ClusterInstanceInfo(Reply):
    instance_name: str
    healthy: bool
    container_started: bool
    service_running: bool
    maintenance_mode: bool
    zone: str | None = None
    allocator_id: str | None = None
    memory: ClusterInstanceMemoryInfo | None = None
    address: str | None = Field(None, description="Muster: HOST:PORT the instance listens on")


class ClusterTopologyInfo(Reply):
    healthy: bool
    instances: list[ClusterInstanceInfo]


class ClusterPlanInfo(Reply):
    plan_attempt_id: str | None = None
    plan_attempt_name: str | None = None
    healthy: bool
    attempt_start_time: str | None = None
    attempt_end_time: str | None = None
    plan: dict[str, Any] | None = None
    plan_attempt_log: list[dict[str, Any]]
    warnings: list[dict[str, Any]]
    error: dict[str, Any] | None = None


class ClusterPlansInfo(Reply):
    healthy: bool
    current: ClusterPlanInfo | None = None
    pending: ClusterPlanInfo | None = None
    history: list[ClusterPlanInfo]


class ClusterMetadataPortInfo(Reply):
    http: int
    https: int


class ClusterMetadataInfo(Reply):
    version: int
    last_modified: str
    endpoint: str | None = Field(None, description="The deployment's name at the proxies")
    service_url: str | None = Field(None, description="Its HTTPS URL through the proxies")
    ports: ClusterMetadataPortInfo | None = None


class ContainerClusterInfo(Reply):
    cluster_id: str
    cluster_name: str
    deployment_id: str
    healthy: bool
    status: str
    plan_info: ClusterPlansInfo
    topology: ClusterTopologyInfo
    metadata: ClusterMetadataInfo
    external_links: list[dict[str, Any]]


class ContainerResourceInfo(Reply):
    ref_id: str
    id: str
    region: str
    info: ContainerClusterInfo


class DeploymentResources(Reply):
    elasticsearch: list[dict[str, Any]]
    kibana: list[dict[str, Any]]
    apm: list[dict[str, Any]]
    appsearch: list[dict[str, Any]]
    enterprise_search: list[dict[str, Any]]
    integrations_server: list[dict[str, Any]]
    container: list[ContainerResourceInfo] = Field(description="Muster: container resources")


class DeploymentMetadata(Reply):
    last_modified: str
    created_at: str | None = None
    owner_id: str | None = None


class DeploymentGetResponse(Reply):
    id: str
    name: str
    healthy: bool
    resources: DeploymentResources
    metadata: DeploymentMetadata
