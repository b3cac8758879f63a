"""Deployments in the domain: every bad field of a request named and nothing written; create,
update, shut down and delete, with their placements and audit events, on a real SQLite store."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from muster.domain import deployment_documents as documents
from muster.domain import deployments
from muster.domain.deployments import DeploymentAdmin
from muster.domain.models import AllocatorRecord, HostReport, RunnerRecord
from muster.domain.platform import Platform
from muster.domain.users import Principal
from muster.errors import ConflictError, InvalidInputError, NotFoundError
from tests.conftest import Installed

ADMIN = Principal(name="admin", role="admin", method="basic")
FLEET = {"alloc-a": "zone-1", "alloc-b": "zone-2", "alloc-c": "zone-2"}


def body(**plan: Any) -> dict[str, Any]:
    """ECE's create body with one container resource; `plan` overrides parts of the plan."""
    base: dict[str, Any] = {
        "cluster_topology": [{"zone_count": 2, "size": {"resource": "memory", "value": 512}}],
        "container": {
            "image": "registry.example:5000/team/web:1.4",
            "command": ["sh", "-c", "exec web --listen $HOST:$PORT"],
            "env": {"MODE": "prod"},
        },
    }
    base.update(plan)
    return {
        "name": "web",
        "resources": {"container": [{"ref_id": "main", "region": "ece-region", "plan": base}]},
    }


@pytest.fixture
def admin(installed: Installed) -> DeploymentAdmin:
    with installed.platform.store.write() as tx:
        tx.create_allocators(AllocatorRecord(aid, zone, 2048) for aid, zone in FLEET.items())
    return DeploymentAdmin(installed.platform, ADMIN, "192.0.2.1", connected=set(FLEET))


def written(platform: Platform) -> tuple[int, int, int]:
    """(deployments, instances, audit events of deployments) in the store."""
    with platform.store.read() as tx:
        events, _total = tx.list_audit(limit=100)
        return (
            len(tx.list_deployments()),
            len(tx.list_instances()),
            len([e for e in events if e.kind.startswith("deployment.")]),
        )


def used(platform: Platform) -> dict[str, int]:
    with platform.store.read() as tx:
        return {c.allocator_id: c.used_mb for c in tx.list_placement_candidates()}


BAD_FIELDS = [
    (lambda b: b.update(name=""), "name"),
    (lambda b: b.update(name="x" * 129), "name"),
    (lambda b: b["resources"].update(elasticsearch=[{}]), "resources.elasticsearch"),
    (lambda b: b["resources"]["container"][0].update(ref_id="no spaces"), "ref_id"),
    (lambda b: b["resources"]["container"][0].update(region="elsewhere"), "region"),
    (
        lambda b: b["resources"]["container"].append(copy.deepcopy(b["resources"]["container"][0])),
        "resources.container[1].ref_id",
    ),
]
PLAN = "resources.container[0].plan"
BAD_PLANS = [
    ({"cluster_topology": []}, f"{PLAN}.cluster_topology"),
    (
        {"cluster_topology": [{"zone_count": 0, "size": {"value": 512}}]},
        f"{PLAN}.cluster_topology[0].zone_count",
    ),
    (
        {"cluster_topology": [{"zone_count": 1, "size": {"value": 128}}]},
        f"{PLAN}.cluster_topology[0].size.value",
    ),
    (
        {"cluster_topology": [{"zone_count": 1, "size": {"value": 600}}]},
        f"{PLAN}.cluster_topology[0].size.value",
    ),
    (
        {"cluster_topology": [{"zone_count": 1, "size": {"value": "512"}}]},
        f"{PLAN}.cluster_topology[0].size.value",
    ),
    (
        {"cluster_topology": [{"zone_count": 1, "size": {"resource": "cpu", "value": 512}}]},
        f"{PLAN}.cluster_topology[0].size.resource",
    ),
    (
        {"cluster_topology": [{"zone_count": 1, "size": {"value": 512}, "extra": 1}]},
        f"{PLAN}.cluster_topology[0].extra",
    ),
    ({"container": {"image": "Upper/Case"}}, f"{PLAN}.container.image"),
    ({"container": {"image": "web:bad tag"}}, f"{PLAN}.container.image"),
    ({"container": {"image": "registry:5000/web@sha256:abc"}}, f"{PLAN}.container.image"),
    ({"container": {"image": ""}}, f"{PLAN}.container.image"),
    ({"container": {}}, f"{PLAN}.container.image"),
    ({"container": {"image": "web", "command": "sh -c x"}}, f"{PLAN}.container.command"),
    ({"container": {"image": "web", "command": ["sh", 1]}}, f"{PLAN}.container.command[1]"),
    ({"container": {"image": "web", "command": ["a\x00b"]}}, f"{PLAN}.container.command[0]"),
    ({"container": {"image": "web", "env": {"1BAD": "x"}}}, f"{PLAN}.container.env"),
    ({"container": {"image": "web", "env": {"A": "x\x00"}}}, f"{PLAN}.container.env.A"),
    ({"container": {"image": "web", "env": {"A": "x" * 8193}}}, f"{PLAN}.container.env.A"),
    ({"container": {"image": "web", "env": {"PORT": "80"}}}, f"{PLAN}.container.env.PORT"),
    (
        {"container": {"image": "web", "env": {f"K{n}": "v" for n in range(129)}}},
        f"{PLAN}.container.env",
    ),
]


@pytest.mark.parametrize(("change", "field"), BAD_FIELDS)
def test_bad_request_field_is_named_and_nothing_written(
    admin: DeploymentAdmin, change: Any, field: str
) -> None:
    request = body()
    change(request)
    with pytest.raises(InvalidInputError) as refused:
        admin.create(request)
    assert any(f.endswith(field) for f in refused.value.fields), refused.value.fields
    assert written(admin.platform) == (0, 0, 0)


@pytest.mark.parametrize(("plan", "field"), BAD_PLANS)
def test_bad_plan_field_is_named_and_nothing_written(
    admin: DeploymentAdmin, plan: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInputError) as refused:
        admin.create(body(**plan))
    assert refused.value.fields == [field]
    assert refused.value.message.startswith(field)
    assert written(admin.platform) == (0, 0, 0)


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "library/busybox:1.36",
        "registry.example:5000/team/web:1.4",
        "localhost/web_app__x.y-z:v1.0-rc.1",
        "[::1]:5000/web",
        "web@sha256:" + "a" * 64,
    ],
)
def test_docker_references_are_accepted(admin: DeploymentAdmin, image: str) -> None:
    reply = admin.create(body(container={"image": image}), validate_only=True)
    assert reply["created"] is False


def test_more_zones_than_exist_is_refused(admin: DeploymentAdmin) -> None:
    plan = {"cluster_topology": [{"zone_count": 3, "size": {"value": 512}}]}
    with pytest.raises(InvalidInputError) as refused:
        admin.create(body(**plan))
    assert refused.value.fields == [f"{PLAN}.cluster_topology[0].zone_count"]
    assert "are in 2" in refused.value.message
    assert written(admin.platform) == (0, 0, 0)


def test_no_capacity_is_refused_with_what_was_needed_and_nothing_half_placed(
    admin: DeploymentAdmin,
) -> None:
    # zone-1 has one 2048 MB allocator: a second 1024 MB instance there cannot fit.
    two = {
        "cluster_topology": [
            {"zone_count": 2, "size": {"value": 1024}},
            {"zone_count": 2, "size": {"value": 1536}},
        ]
    }
    with pytest.raises(InvalidInputError) as refused:
        admin.create(body(**two))
    assert refused.value.code == "deployments.insufficient_capacity"
    assert "needs 1536 MB in 2 zones" in refused.value.message
    assert "2048 MB in zone-1" in refused.value.message
    assert written(admin.platform) == (0, 0, 0)
    assert set(used(admin.platform).values()) == {0}


def test_validate_only_places_nothing(admin: DeploymentAdmin) -> None:
    reply = admin.create(body(), validate_only=True)
    assert reply["created"] is False
    assert reply["plans"][0]["plan"]["cluster_topology"][0]["size"]["value"] == 512
    assert written(admin.platform) == (0, 0, 0)


def test_create_places_one_instance_per_zone_and_is_audited(admin: DeploymentAdmin) -> None:
    reply = admin.create(body())
    assert reply["created"] is True
    assert reply["name"] == "web"
    (resource,) = reply["resources"]
    assert (resource["ref_id"], resource["kind"], resource["region"]) == (
        "main",
        "container",
        "ece-region",
    )
    assert written(admin.platform) == (1, 2, 1)
    assert used(admin.platform) == {"alloc-a": 512, "alloc-b": 512, "alloc-c": 0}
    doc = documents.get_deployment(admin.platform, reply["id"])
    info = doc["resources"]["container"][0]["info"]
    instances = info["topology"]["instances"]
    assert [(i["instance_name"], i["zone"]) for i in instances] == [
        ("instance-0000000000", "zone-1"),
        ("instance-0000000001", "zone-2"),
    ]
    assert {i["container_started"] for i in instances} == {False}
    assert info["status"] == "initializing"
    assert "current" not in info["plan_info"]
    assert info["plan_info"]["pending"]["plan"]["container"]["env"] == {"MODE": "prod"}
    listed = documents.list_deployments(admin.platform)["deployments"]
    assert [(d["id"], d["name"]) for d in listed] == [(reply["id"], "web")]


def test_update_resizes_moves_and_keeps_instances(admin: DeploymentAdmin) -> None:
    created = admin.create(body())
    # Same size, new image: both instances stay; then one zone fewer; then bigger.
    admin.update(created["id"], body(container={"image": "web:2"}) | {"prune_orphans": False})
    doc = documents.get_deployment(admin.platform, created["id"], show_plan_history=True)
    info = doc["resources"]["container"][0]["info"]
    assert [i["instance_name"] for i in info["topology"]["instances"]] == [
        "instance-0000000000",
        "instance-0000000001",
    ]
    assert [a["plan"]["container"]["image"] for a in info["plan_info"]["history"]] == [
        "registry.example:5000/team/web:1.4"
    ]
    bigger = {"cluster_topology": [{"zone_count": 1, "size": {"value": 2048}}]}
    admin.update(created["id"], body(**bigger))
    with admin.platform.store.read() as tx:
        (instance,) = tx.list_instances()
    assert (instance.instance_name, instance.memory_mb, instance.plan_version) == (
        "instance-0000000002",
        2048,
        3,
    )
    assert sum(used(admin.platform).values()) == 2048


def test_update_that_does_not_fit_changes_nothing(admin: DeploymentAdmin) -> None:
    created = admin.create(body())
    huge = {"cluster_topology": [{"zone_count": 2, "size": {"value": 4096}}]}
    with pytest.raises(InvalidInputError):
        admin.update(created["id"], body(**huge))
    assert used(admin.platform) == {"alloc-a": 512, "alloc-b": 512, "alloc-c": 0}
    assert written(admin.platform) == (1, 2, 1)


def test_validate_only_update_changes_nothing(admin: DeploymentAdmin) -> None:
    created = admin.create(body())
    bigger = {"cluster_topology": [{"zone_count": 2, "size": {"value": 1024}}]}
    admin.update(created["id"], body(**bigger), validate_only=True)
    assert used(admin.platform) == {"alloc-a": 512, "alloc-b": 512, "alloc-c": 0}
    assert written(admin.platform) == (1, 2, 1)


def test_delete_needs_a_shut_down_deployment(admin: DeploymentAdmin) -> None:
    created = admin.create(body())
    with pytest.raises(InvalidInputError) as running:
        admin.delete(created["id"])
    assert running.value.code == "deployments.resource_not_shutdown"
    admin.shutdown(created["id"])
    assert set(used(admin.platform).values()) == {0}
    doc = documents.get_deployment(admin.platform, created["id"])
    assert doc["resources"]["container"][0]["info"]["status"] == "stopped"
    with pytest.raises(ConflictError):
        admin.update(created["id"], body())
    assert admin.delete(created["id"]) == {"id": created["id"], "name": "web"}
    with pytest.raises(NotFoundError) as gone:
        documents.get_deployment(admin.platform, created["id"])
    assert gone.value.code == "deployments.deployment_not_found"
    assert written(admin.platform) == (0, 0, 3)


def test_connected_allocators_come_from_heartbeats(installed: Installed) -> None:
    platform, now = installed.platform, installed.clock.now()
    with platform.store.write() as tx:
        for aid, beat in (("alive", now), ("silent", None)):
            tx.create_allocator(AllocatorRecord(aid, "zone-1", 2048))
            tx.create_runner(
                RunnerRecord(
                    aid,
                    "10.0.0.9",
                    aid,
                    "zone-1",
                    ("allocator",),
                    f"{aid}-serial",
                    now,
                    now,
                    HostReport(),
                    last_heartbeat_at=beat,
                )
            )
    assert deployments.connected_allocators(platform) == {"alive"}


def test_prune_orphans_removes_resources_left_out(admin: DeploymentAdmin) -> None:
    request = body()
    extra = copy.deepcopy(request["resources"]["container"][0])
    extra["ref_id"] = "sidecar"
    extra["plan"]["cluster_topology"][0]["zone_count"] = 1
    request["resources"]["container"].append(extra)
    created = admin.create(request)
    assert written(admin.platform)[1] == 3
    # Without prune_orphans the sidecar stays; with it, it goes.
    admin.update(created["id"], body() | {"prune_orphans": False})
    assert written(admin.platform)[1] == 3
    reply = admin.update(created["id"], body() | {"prune_orphans": True})
    assert [r["ref_id"] for r in reply["resources"]] == ["main"]
    assert written(admin.platform)[1] == 2
    assert sum(used(admin.platform).values()) == 1024
