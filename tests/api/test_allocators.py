"""Tests of ECE's allocators API over HTTP: listing, search, one allocator, maintenance, metadata,
settings, deletion, RBAC and region paths; replies are checked against ECE's own schema."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster.api.schemas_infra import AllocatorOverview, RunnerOverview
from muster.domain.models import AllocatorRecord, HostReport
from tests.conftest import Installed, create_token, first_heartbeat, join

ALLOCATORS = "/api/v1/platform/infrastructure/allocators"
RUNNERS = "/api/v1/platform/infrastructure/runners"
SPEC = Path("/work/shared/reference/apidocs.json")


# ---- ECE's schema -------------------------------------------------------------------------------


def _definitions() -> dict[str, Any]:
    if not SPEC.exists():
        pytest.skip(f"ECE's apidocs.json is not at {SPEC}")
    definitions: dict[str, Any] = json.loads(SPEC.read_text())["definitions"]
    return definitions


def _check(value: Any, schema: dict[str, Any], defs: dict[str, Any], where: str) -> None:
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind == "object":
        assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
        for name in schema.get("required", []):
            assert name in value, f"{where}.{name}: required by ECE but missing"
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _check(value[name], sub, defs, f"{where}.{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                _check(item, extra, defs, f"{where}.{name}")
    elif kind == "array":
        assert isinstance(value, list), f"{where}: expected an array, got {value!r}"
        for i, item in enumerate(value):
            _check(item, schema.get("items", {}), defs, f"{where}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), f"{where}: expected a string, got {value!r}"
        assert value in schema.get("enum", [value]), f"{where}: {value!r} not in ECE's enum"
    elif kind == "integer":
        assert isinstance(value, int), f"{where}: expected an integer, got {value!r}"
        assert not isinstance(value, bool), f"{where}: expected an integer, got {value!r}"
    elif kind == "number":
        assert isinstance(value, int | float), f"{where}: expected a number, got {value!r}"
        assert not isinstance(value, bool), f"{where}: expected a number, got {value!r}"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where}: expected a boolean, got {value!r}"


def assert_ece_shape(value: Any, definition: str) -> None:
    """Fail unless `value` has every field ECE's `definition` requires, with ECE's types."""
    defs = _definitions()
    _check(value, {"$ref": f"#/definitions/{definition}"}, defs, definition)


# ---- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def fleet(client: TestClient, installed: Installed) -> Installed:
    """Three allocators: 10.0.0.1 (zone 1, 2048 MB), .2 (zone 2, 8192), .3 (zone 2, 4096)."""
    token = create_token(client, installed)["token"]
    for host, zone, capacity in (
        ("10.0.0.1", "ece-zone-1", 2048),
        ("10.0.0.2", "ece-zone-2", 8192),
        ("10.0.0.3", "ece-zone-2", 4096),
    ):
        reply = join(client, token, host, host_ip=host, zone=zone, capacity_mb=capacity)
        assert reply.status_code == 200, reply.text
        first_heartbeat(installed, host)
    return installed


def ids(overview: dict[str, Any]) -> list[str]:
    return [a["allocator_id"] for zone in overview["zones"] for a in zone["allocators"]]


def get(client: TestClient, installed: Installed, path: str = "", /, **params: Any) -> Any:
    response = client.get(ALLOCATORS + path, params=params, auth=installed.readonly)
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["errors"][0]["code"] == code
    assert response.headers["x-cloud-error-codes"] == code


# ---- listing and search -------------------------------------------------------------------------


def test_allocators_are_listed_by_zone_with_capacity(client: TestClient, fleet: Installed) -> None:
    overview = get(client, fleet)
    assert_ece_shape(overview, "AllocatorOverview")
    assert [z["zone_id"] for z in overview["zones"]] == ["ece-zone-1", "ece-zone-2"]
    assert ids(overview) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    first = overview["zones"][0]["allocators"][0]
    assert first["capacity"]["memory"] == {"total": 2048, "used": 0}
    assert first["capacity"]["storage"] == {"total": 100_000}
    assert first["host_ip"] == "10.0.0.1"
    assert first["status"]["connected"] is True


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("zone_id:ece-zone-2", ["10.0.0.2", "10.0.0.3"]),
        ("capacity.memory.total:>4000", ["10.0.0.2", "10.0.0.3"]),
        ("zone_id:ece-zone-2 AND capacity.memory.total:<5000", ["10.0.0.3"]),
        ("status.connected:false", []),
    ],
)
def test_q_filters_allocators(
    client: TestClient, fleet: Installed, q: str, expected: list[str]
) -> None:
    assert ids(get(client, fleet, q=q)) == expected


def test_from_size_and_sort_page_the_allocators(client: TestClient, fleet: Installed) -> None:
    # Sorting and paging run over all allocators; the page is then grouped by zone.
    assert ids(get(client, fleet, sort="capacity.memory.total")) == [
        "10.0.0.1",
        "10.0.0.3",
        "10.0.0.2",
    ]
    assert ids(get(client, fleet, sort="-capacity.memory.total")) == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]
    page = get(client, fleet, sort="capacity.memory.total", **{"from": 1, "size": 1})
    assert ids(page) == ["10.0.0.3"]
    assert [z["zone_id"] for z in page["zones"]] == ["ece-zone-2"]
    assert ids(get(client, fleet, size=0)) == []


def test_listing_replies_are_the_bytes_their_response_models_serialise(
    client: TestClient, fleet: Installed
) -> None:
    # Listings are serialised without validating them again: they must still be, byte for
    # byte, what validating them as their response models and serialising would give.
    platform = fleet.platform
    platform.liveness.beat(
        "10.0.0.2", HostReport(checks={"is_docker_healthy": False, "disk": True})
    )
    platform.liveness.beat("10.0.0.3", HostReport(storage_mib=7, version="1.2.3"))
    with platform.store.write() as tx:  # an allocator whose runner is gone
        tx.create_allocator(AllocatorRecord("10.0.0.9", "ece-zone-3", 1024, tags={"rack": "r"}))
    client.put(ALLOCATORS + "/10.0.0.1/settings", json={"capacity": 16384}, auth=fleet.admin)
    client.put(ALLOCATORS + "/10.0.0.1/metadata/zkey", json={"value": 'é\n"x'}, auth=fleet.admin)
    client.post(ALLOCATORS + "/10.0.0.3/maintenance-mode/_start", auth=fleet.admin)
    replies: list[tuple[type[AllocatorOverview | RunnerOverview], Any]] = [
        (AllocatorOverview, client.get(ALLOCATORS, auth=fleet.readonly)),
        (AllocatorOverview, client.get(ALLOCATORS + "?q=zone:ece-zone-2", auth=fleet.readonly)),
        (AllocatorOverview, client.post(ALLOCATORS + "/_search", json={}, auth=fleet.readonly)),
        (RunnerOverview, client.get(RUNNERS, auth=fleet.readonly)),
        (RunnerOverview, client.post(RUNNERS + "/_search", json={}, auth=fleet.readonly)),
    ]
    for model, reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        validated = model.model_validate(reply.json())
        assert reply.content == validated.model_dump_json(by_alias=True, exclude_none=True).encode()
    assert len(ids(replies[0][1].json())) == 4
    assert_ece_shape(replies[0][1].json(), "AllocatorOverview")


def test_pages_of_a_larger_fleet_add_up_to_the_whole_listing(
    client: TestClient, installed: Installed
) -> None:
    with installed.platform.store.write() as tx:
        for i in range(45):
            zone = f"ece-zone-{i % 3}"
            tx.create_allocator(AllocatorRecord(f"a{(i * 7) % 45:02d}", zone, 1024 * (i % 4 + 1)))
    sort = "zone_id,-capacity,allocator_id"  # zone first: grouping a page keeps this order
    whole = ids(get(client, installed, sort=sort, size=100))
    assert len(whole) == 45
    pages = [ids(get(client, installed, sort=sort, size=8, **{"from": f})) for f in range(0, 48, 8)]
    assert [i for page in pages for i in page] == whole
    assert ids(get(client, installed, q="zone:ece-zone-1", sort=sort)) == [
        i
        for i in whole
        if int(i[1:]) * 13 % 45 % 3 == 1  # a{7i mod 45} is in zone i mod 3
    ]


def test_malformed_q_is_a_400_naming_the_problem(client: TestClient, fleet: Installed) -> None:
    response = client.get(ALLOCATORS, params={"q": "zone_id:(a"}, auth=fleet.readonly)
    assert_error(response, 400, "allocators.invalid_query")
    assert "never closed" in response.json()["errors"][0]["message"]
    assert_error(
        client.get(ALLOCATORS, params={"size": -1}, auth=fleet.readonly),
        400,
        "allocators.invalid_input",
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        ({"query": {"match_all": {}}}, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        ({"query": {"term": {"zone_id": {"value": "ece-zone-1"}}}}, ["10.0.0.1"]),
        (
            {
                "query": {
                    "bool": {
                        "must": [
                            {"term": {"zone_id": "ece-zone-2"}},
                            {"range": {"capacity.memory.total": {"gte": 8000}}},
                        ]
                    }
                }
            },
            ["10.0.0.2"],
        ),
        ({"query": {"query_string": {"query": "allocator_id:10.0.0.3"}}}, ["10.0.0.3"]),
        ({"size": 1, "from": 1, "sort": [{"allocator_id": "desc"}]}, ["10.0.0.2"]),
    ],
)
def test_search_body_selects_allocators(
    client: TestClient, fleet: Installed, body: Any, expected: list[str]
) -> None:
    response = client.post(ALLOCATORS + "/_search", json=body, auth=fleet.readonly)
    assert response.status_code == 200, response.text
    assert_ece_shape(response.json(), "AllocatorOverview")
    assert ids(response.json()) == expected


def test_unsupported_search_clause_is_a_400(client: TestClient, fleet: Installed) -> None:
    body = {"query": {"fuzzy": {"zone_id": "x"}}}
    response = client.post(ALLOCATORS + "/_search", json=body, auth=fleet.readonly)
    assert_error(response, 400, "allocators.invalid_query")


# ---- one allocator, liveness ------------------------------------------------------------------


def test_one_allocator_is_ece_shaped_and_unknown_is_404(
    client: TestClient, fleet: Installed
) -> None:
    doc = get(client, fleet, "/10.0.0.2")
    assert_ece_shape(doc, "AllocatorInfo")
    assert (doc["allocator_id"], doc["zone_id"]) == ("10.0.0.2", "ece-zone-2")
    response = client.get(ALLOCATORS + "/10.9.9.9", auth=fleet.readonly)
    assert_error(response, 404, "allocators.allocator_not_found")
    assert_ece_shape(response.json(), "BasicFailedReply")


def test_allocator_is_connected_until_heartbeats_stop_and_again_after_one(
    client: TestClient, fleet: Installed
) -> None:
    assert get(client, fleet, "/10.0.0.1")["status"]["connected"] is True
    fleet.clock.advance(fleet.platform.liveness.grace + timedelta(seconds=1))
    assert get(client, fleet, "/10.0.0.1")["status"]["connected"] is False
    assert ids(get(client, fleet, q="status.connected:false")) == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]
    fleet.platform.liveness.beat("10.0.0.1", HostReport(storage_mib=5))
    assert get(client, fleet, "/10.0.0.1")["status"]["connected"] is True
    assert ids(get(client, fleet, q="status.connected:true")) == ["10.0.0.1"]


def test_region_scoped_path_serves_the_same_allocators(
    client: TestClient, fleet: Installed
) -> None:
    regional = "/api/v1/regions/ece-region/platform/infrastructure/allocators"
    response = client.get(regional, auth=fleet.readonly)
    assert response.status_code == 200
    assert ids(response.json()) == ids(get(client, fleet))
    other = client.get(regional.replace("ece-region", "us-east-1"), auth=fleet.readonly)
    assert other.status_code == 404


# ---- maintenance, metadata, settings ----------------------------------------------------------


def test_maintenance_start_and_stop_are_accepted_and_shown(
    client: TestClient, fleet: Installed
) -> None:
    path = ALLOCATORS + "/10.0.0.1/maintenance-mode/"
    response = client.post(path + "_start", params={"reason": "disk swap"}, auth=fleet.admin)
    assert (response.status_code, response.json()) == (202, {})
    assert get(client, fleet, "/10.0.0.1")["status"]["maintenance_mode"] is True
    assert ids(get(client, fleet, q="status.maintenance_mode:true")) == ["10.0.0.1"]
    assert client.post(path + "_stop", auth=fleet.admin).status_code == 202
    assert get(client, fleet, "/10.0.0.1")["status"]["maintenance_mode"] is False
    missing = client.post(ALLOCATORS + "/nope/maintenance-mode/_start", auth=fleet.admin)
    assert_error(missing, 404, "allocators.allocator_not_found")


def test_metadata_put_get_put_one_delete_one(client: TestClient, fleet: Installed) -> None:
    path = ALLOCATORS + "/10.0.0.1/metadata"
    items = {"items": [{"key": "rack", "value": "r1"}, {"key": "disk", "value": "ssd"}]}
    put = client.put(path, json=items, auth=fleet.admin)
    assert put.status_code == 200, put.text
    assert put.json() == [{"key": "disk", "value": "ssd"}, {"key": "rack", "value": "r1"}]
    one = client.put(path + "/rack", json={"value": "r2"}, auth=fleet.admin)
    assert {"key": "rack", "value": "r2"} in one.json()
    deleted = client.delete(path + "/disk", auth=fleet.admin)
    assert deleted.json() == [{"key": "rack", "value": "r2"}]
    got = client.get(path, auth=fleet.readonly)
    assert got.json() == [{"key": "rack", "value": "r2"}]
    assert got.headers["x-cloud-resource-version"] == deleted.headers["x-cloud-resource-version"]
    assert ids(get(client, fleet, q="metadata.rack:r2")) == ["10.0.0.1"]
    assert get(client, fleet, "/10.0.0.1")["metadata"] == [{"key": "rack", "value": "r2"}]


def test_metadata_errors_use_ece_codes(client: TestClient, fleet: Installed) -> None:
    path = ALLOCATORS + "/10.0.0.1/metadata"
    empty = client.put(path, json={"items": [{"key": "k", "value": ""}]}, auth=fleet.admin)
    assert_error(empty, 400, "allocators.invalid_empty_metadata_items")
    assert_error(
        client.put(path + "/k", json={"value": ""}, auth=fleet.admin),
        400,
        "allocators.invalid_empty_metadata_item",
    )
    assert_error(
        client.delete(path + "/k", auth=fleet.admin), 404, "allocators.metadata_item_not_found"
    )
    assert_error(
        client.put(path, json={"items": "nope"}, auth=fleet.admin), 400, "allocators.invalid_input"
    )


def test_stale_metadata_version_is_refused_with_409(client: TestClient, fleet: Installed) -> None:
    path = ALLOCATORS + "/10.0.0.1/metadata"
    version = client.get(path, auth=fleet.readonly).headers["x-cloud-resource-version"]
    first = client.put(
        path + "/a", params={"version": version}, json={"value": "1"}, auth=fleet.admin
    )
    assert first.status_code == 200
    again = client.put(
        path + "/a", params={"version": version}, json={"value": "2"}, auth=fleet.admin
    )
    assert_error(again, 409, "allocators.version_conflict")
    assert client.get(path, auth=fleet.readonly).json() == [{"key": "a", "value": "1"}]


def test_settings_capacity_override_is_reflected_in_capacity(
    client: TestClient, fleet: Installed
) -> None:
    path = ALLOCATORS + "/10.0.0.1/settings"
    assert client.get(path, auth=fleet.readonly).json() == {}
    put = client.put(path, json={"capacity": 16384}, auth=fleet.admin)
    assert put.json() == {"capacity": 16384}
    assert get(client, fleet, "/10.0.0.1")["capacity"]["memory"]["total"] == 16384
    assert client.patch(path, json={"capacity": 12288}, auth=fleet.admin).json() == {
        "capacity": 12288
    }
    assert get(client, fleet, "/10.0.0.1")["capacity"]["memory"]["total"] == 12288
    assert client.patch(path, json={}, auth=fleet.admin).json() == {"capacity": 12288}
    assert client.patch(path, json={"capacity": None}, auth=fleet.admin).json() == {}
    assert get(client, fleet, "/10.0.0.1")["capacity"]["memory"]["total"] == 2048


def test_settings_patch_also_takes_the_json_string_eces_spec_declares(
    client: TestClient, fleet: Installed
) -> None:
    path = ALLOCATORS + "/10.0.0.1/settings"
    response = client.patch(path, json='{"capacity": 9000}', auth=fleet.admin)
    assert response.json() == {"capacity": 9000}
    assert get(client, fleet, "/10.0.0.1")["capacity"]["memory"]["total"] == 9000


@pytest.mark.parametrize(
    "body",
    ["{not json", {"capacity": 0}, {"capacity": "8192"}, '"a string"', "[1]", [], 5],
)
def test_bad_settings_are_400_and_change_nothing(
    client: TestClient, fleet: Installed, body: Any
) -> None:
    path = ALLOCATORS + "/10.0.0.1/settings"
    response = client.patch(path, json=body, auth=fleet.admin)
    assert_error(response, 400, "allocators.invalid_input")
    assert client.get(path, auth=fleet.readonly).json() == {}


def test_settings_keep_fields_beyond_capacity(client: TestClient, fleet: Installed) -> None:
    path = ALLOCATORS + "/10.0.0.1/settings"
    put = client.put(path, json={"capacity": 4096, "x": {"a": 1, "b": 2}}, auth=fleet.admin)
    assert put.json() == {"capacity": 4096, "x": {"a": 1, "b": 2}}
    patched = client.patch(path, json='{"x": {"a": null, "c": 3}}', auth=fleet.admin)
    assert patched.json() == {"capacity": 4096, "x": {"b": 2, "c": 3}}  # a merge patch
    assert client.get(path, auth=fleet.readonly).json() == patched.json()
    assert client.put(path, json={"y": True}, auth=fleet.admin).json() == {"y": True}
    huge = client.put(path, json={f"k{i}": i for i in range(200)}, auth=fleet.admin)
    assert_error(huge, 400, "allocators.invalid_input")


@pytest.mark.parametrize("part", ["metadata", "settings"])
def test_metadata_and_settings_say_when_made_and_changed(
    client: TestClient, fleet: Installed, part: str
) -> None:
    path = f"{ALLOCATORS}/10.0.0.1/{part}"
    made = client.get(path, auth=fleet.readonly).headers
    assert made["x-cloud-resource-created"] == made["x-cloud-resource-last-modified"]
    fleet.clock.advance(timedelta(minutes=5))
    body = {"items": [{"key": "k", "value": "v"}]} if part == "metadata" else {"capacity": 99}
    assert client.put(path, json=body, auth=fleet.admin).status_code == 200
    changed = client.get(path, auth=fleet.readonly).headers
    assert changed["x-cloud-resource-created"] == made["x-cloud-resource-created"]
    assert changed["x-cloud-resource-last-modified"] > made["x-cloud-resource-last-modified"]
    assert changed["x-cloud-resource-version"] != made["x-cloud-resource-version"]


def test_maintenance_mode_timestamp_is_when_it_last_changed(
    client: TestClient, fleet: Installed
) -> None:
    joined = get(client, fleet, "/10.0.0.1")["status"]["maintenance_mode_timestamp"]
    fleet.clock.advance(timedelta(hours=1))
    start = ALLOCATORS + "/10.0.0.1/maintenance-mode/_start"
    assert client.post(start, auth=fleet.admin).status_code == 202
    started = get(client, fleet, "/10.0.0.1")["status"]["maintenance_mode_timestamp"]
    assert started > joined
    assert started.startswith(str(fleet.clock.now().year))
    fleet.clock.advance(timedelta(hours=1))
    assert client.post(start, auth=fleet.admin).status_code == 202  # already on: unchanged
    assert get(client, fleet, "/10.0.0.1")["status"]["maintenance_mode_timestamp"] == started


def test_search_takes_simple_query_string(client: TestClient, fleet: Installed) -> None:
    query = {"simple_query_string": {"query": "ece-zone-1 | 10.0.0.3", "fields": ["zone_id"]}}
    found = client.post(ALLOCATORS + "/_search", json={"query": query}, auth=fleet.readonly)
    assert found.status_code == 200, found.text
    assert ids(found.json()) == ["10.0.0.1"]
    query["simple_query_string"]["fields"] = ["zone_id", "host_ip"]
    found = client.post(ALLOCATORS + "/_search", json={"query": query}, auth=fleet.readonly)
    assert ids(found.json()) == ["10.0.0.1", "10.0.0.3"]


# ---- deletion ---------------------------------------------------------------------------------


def test_delete_is_refused_while_connected_and_allowed_once_disconnected(
    client: TestClient, fleet: Installed
) -> None:
    refused = client.delete(ALLOCATORS + "/10.0.0.1", auth=fleet.admin)
    assert_error(refused, 400, "allocators.delete_connected_allocator_attempt")
    fleet.clock.advance(fleet.platform.liveness.grace + timedelta(seconds=1))
    deleted = client.delete(ALLOCATORS + "/10.0.0.1", auth=fleet.admin)
    assert (deleted.status_code, deleted.json()) == (200, {})
    assert ids(get(client, fleet)) == ["10.0.0.2", "10.0.0.3"]
    assert_error(
        client.delete(ALLOCATORS + "/10.0.0.1", auth=fleet.admin),
        404,
        "allocators.allocator_not_found",
    )


# ---- access -------------------------------------------------------------------------------------

WRITES = [
    ("delete", "/10.0.0.1", None),
    ("post", "/10.0.0.1/maintenance-mode/_start", None),
    ("post", "/10.0.0.1/maintenance-mode/_stop", None),
    ("put", "/10.0.0.1/metadata", {"items": [{"key": "k", "value": "v"}]}),
    ("put", "/10.0.0.1/metadata/k", {"value": "v"}),
    ("delete", "/10.0.0.1/metadata/k", None),
    ("put", "/10.0.0.1/settings", {"capacity": 9000}),
    ("patch", "/10.0.0.1/settings", {"capacity": 9000}),
]


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
def test_readonly_user_cannot_write(
    client: TestClient, fleet: Installed, method: str, path: str, body: Any
) -> None:
    before = get(client, fleet, "/10.0.0.1")
    response = client.request(method.upper(), ALLOCATORS + path, json=body, auth=fleet.readonly)
    assert_error(response, 403, "root.unauthorized.rbac")
    assert get(client, fleet, "/10.0.0.1") == before


def test_reads_need_credentials(client: TestClient, fleet: Installed) -> None:
    assert_error(client.get(ALLOCATORS), 401, "root.unauthenticated")


def test_operation_ids_and_statuses_are_eces(client: TestClient) -> None:
    spec = client.get("/api/v1/api-docs/openapi.json").json()
    ops = {
        op["operationId"]: (path, method, op)
        for path, methods in spec["paths"].items()
        for method, op in methods.items()
    }
    for op_id in (
        "get-allocators",
        "search-allocators",
        "get-allocator",
        "delete-allocator",
        "get-allocator-metadata",
        "set-allocator-metadata",
        "set-allocator-metadata-item",
        "delete-allocator-metadata-item",
        "get-allocator-settings",
        "set-allocator-settings",
        "update-allocator-settings",
    ):
        assert op_id in ops, op_id
    assert "202" in ops["start-allocator-maintenance-mode"][2]["responses"]
    assert "202" in ops["stop-allocator-maintenance-mode"][2]["responses"]
    assert ops["delete-allocator"][0] == "/api/v1/platform/infrastructure/allocators/{allocator_id}"
