"""ECE's vacate: POST /platform/infrastructure/allocators/{allocator_id}/clusters/_move (also
under /regions/{region}), with its MoveClustersRequest and MoveClustersCommandResponse."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import Field

from muster.api.auth import platform_of, require_admin, source_of
from muster.api.routes import errors
from muster.api.schemas import BasicFailedReplyElement, Reply, Strict
from muster.domain.users import Principal
from muster.domain.vacate import Move, Vacate

router = APIRouter(tags=["PlatformInfrastructure"])
PATH = "/platform/infrastructure/allocators/{allocator_id}/clusters/_move"


class MoveClusterConfiguration(Strict):
    """ECE's Move*ClusterConfiguration: the clusters to move (Muster: resource or deployment
    ids); `plan_override` is accepted and not applied."""

    cluster_ids: list[str] = Field(max_length=1000)
    plan_override: dict[str, Any] | None = None


class MoveContainerClusterConfiguration(MoveClusterConfiguration):
    instance_names: list[str] | None = Field(
        None, max_length=1000, description="Only these instances (Muster's addition)"
    )


class MoveClustersRequest(Strict):
    container_clusters: list[MoveContainerClusterConfiguration] | None = Field(None, max_length=100)
    elasticsearch_clusters: list[MoveClusterConfiguration] | None = Field(None, max_length=100)
    kibana_clusters: list[MoveClusterConfiguration] | None = Field(None, max_length=100)
    apm_clusters: list[MoveClusterConfiguration] | None = Field(None, max_length=100)
    appsearch_clusters: list[MoveClusterConfiguration] | None = Field(None, max_length=100)
    enterprise_search_clusters: list[MoveClusterConfiguration] | None = Field(None, max_length=100)

    def clusters(self) -> list[str] | None:
        groups = (
            self.container_clusters,
            self.elasticsearch_clusters,
            self.kibana_clusters,
            self.apm_clusters,
            self.appsearch_clusters,
            self.enterprise_search_clusters,
        )
        ids = [i for group in groups for c in group or [] for i in c.cluster_ids]
        return ids or None

    def instance_names(self) -> list[str] | None:
        names = [n for c in self.container_clusters or [] for n in c.instance_names or []]
        return names or None


class MoveInstance(Reply):
    instance_name: str
    from_allocator_id: str
    allocator_id: str
    zone: str
    replacement_instance_name: str
    memory_mb: int


class MoveClusterDetails(Reply):
    cluster_id: str
    calculated_plan: dict[str, Any] | None = None
    errors: list[BasicFailedReplyElement] | None = None
    deployment_id: str | None = None
    instances: list[MoveInstance] = []


class MoveClustersDetails(Reply):
    container_clusters: list[MoveClusterDetails]
    elasticsearch_clusters: list[MoveClusterDetails]
    kibana_clusters: list[MoveClusterDetails]
    apm_clusters: list[MoveClusterDetails]
    appsearch_clusters: list[MoveClusterDetails]
    enterprise_search_clusters: list[MoveClusterDetails]

    @classmethod
    def of(cls, containers: list[MoveClusterDetails]) -> MoveClustersDetails:
        """Container clusters; ECE's kinds, which Muster does not run, always empty."""
        return cls(
            container_clusters=containers,
            elasticsearch_clusters=[],
            kibana_clusters=[],
            apm_clusters=[],
            appsearch_clusters=[],
            enterprise_search_clusters=[],
        )


class MoveClustersCommandResponse(Reply):
    moves: MoveClustersDetails
    failures: MoveClustersDetails


def _details(moves: list[Move], *, validate_only: bool) -> list[MoveClusterDetails]:
    by_cluster: dict[str, list[Move]] = {}
    for move in moves:
        by_cluster.setdefault(move.instance.resource_id, []).append(move)
    return [
        MoveClusterDetails(
            cluster_id=cluster_id,
            deployment_id=mine[0].instance.deployment_id,
            instances=[MoveInstance.model_validate(m.to_json()) for m in mine],
            calculated_plan=(
                {"move_instances": [m.to_json() for m in mine]} if validate_only else None
            ),
        )
        for cluster_id, mine in by_cluster.items()
    ]


@router.post(
    PATH,
    operation_id="move-clusters",
    status_code=202,
    response_model=MoveClustersCommandResponse,
    response_model_exclude_none=True,
    responses=errors(400, 401, 403, 404, 429),
)
def move_clusters(
    allocator_id: str,
    request: Request,
    body: MoveClustersRequest | None = Body(None),
    validate_only: bool = Query(False, description="Return the moves; move nothing"),
    allocator_down: bool | None = Query(
        None, description="Release the old instances at once instead of after the new ones run"
    ),
    force_update: bool = Query(False, description="Accepted; moves never wait on plans"),
    move_only: bool = Query(True, description="Accepted; a move changes nothing else"),
    force_move: bool = Query(False, description="Accepted; containers are recreated anyway"),
    principal: Principal = Depends(require_admin),
) -> MoveClustersCommandResponse:
    """Move the allocator's instances (or those of the clusters, and instances, named) to
    other allocators of its zone: each replacement runs before its old instance stops."""
    request_body = body or MoveClustersRequest()
    moves = Vacate(platform_of(request), principal, source_of(request)).vacate(
        allocator_id,
        clusters=request_body.clusters(),
        instance_names=request_body.instance_names(),
        validate_only=validate_only,
        allocator_down=bool(allocator_down),
    )
    return MoveClustersCommandResponse(
        moves=MoveClustersDetails.of(_details(moves, validate_only=validate_only)),
        failures=MoveClustersDetails.of([]),
    )
