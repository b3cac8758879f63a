"""Muster's OpenAPI document against ECE's (shared/reference/apidocs.json, Swagger 2.0).

Data-driven: every operation Muster serves is checked, so new ECE paths join by themselves. An
operation on an ECE path must exist in ECE's spec with the same success status; every field ECE
requires in the request body and in the success reply must be in Muster's schema with a
compatible JSON type (Muster may add fields, never drop or rename one), and every header ECE
declares on the success reply must be declared too. Paths that are Muster's own additions are
listed in MUSTER_ONLY. Operations in LIVE are also called: their replies must validate against
ECE's schema and carry the headers ECE declares.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from fastapi.testclient import TestClient

from muster.api.app import create_app
from muster.clock import FakeClock
from muster.domain import pki
from muster.domain.models import ROLES, HostReport, ProxyReport
from muster.domain.platform import create_platform, load_platform
from muster.domain.runners import JoinRequest, join_host, record_heartbeat
from muster.domain.users import Principal
from muster.storage import open_store
from tests.conftest import Installed, create_token, join

ECE_SPEC = Path(__file__).parents[3] / "shared/reference/apidocs.json"
OPENAPI = "/api/v1/api-docs/openapi.json"
BASE = "/api/v1"
MUSTER_ONLY = ("/agent/", "/platform/audit", "/platform/configuration/security/rotation")
# The ECE operations that must be served whatever else lands.
REQUIRED = {
    ("POST", "/platform/configuration/security/enrollment-tokens"),
    ("GET", "/platform/configuration/security/enrollment-tokens"),
    ("DELETE", "/platform/configuration/security/enrollment-tokens/{token}"),
    ("POST", "/users/auth/_login"),
    ("POST", "/users/auth/_logout"),
    ("POST", "/users/auth/_refresh"),
    ("GET", "/users/auth/keys"),
    ("POST", "/users/auth/keys"),
    ("DELETE", "/users/auth/keys"),
    ("GET", "/users/auth/keys/{api_key_id}"),
    ("DELETE", "/users/auth/keys/{api_key_id}"),
    ("GET", "/users/auth"),
    ("GET", "/users/auth/keys/_all"),
    ("DELETE", "/users/auth/keys/_all"),
    ("GET", "/user"),
    ("PATCH", "/user"),
    ("GET", "/users"),
    ("POST", "/users"),
    ("GET", "/users/{user_name}"),
    ("PATCH", "/users/{user_name}"),
    ("DELETE", "/users/{user_name}"),
}
METHODS = ("get", "put", "post", "delete", "patch")
# Known departures from ECE's spec, each with its reason. They run as strict xfails: they show in
# every report, and the entry must go once the operation conforms.
DEPARTURES: dict[tuple[str, str], str] = {}


# -- the two documents ---------------------------------------------------------------------------
@functools.cache
def ece() -> dict[str, Any] | None:
    if not ECE_SPEC.exists():
        return None
    spec: dict[str, Any] = json.loads(ECE_SPEC.read_text())
    return spec


@functools.cache
def muster() -> dict[str, Any]:
    """The running coordinator's own document, as served."""
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(f"sqlite:///{folder}/muster.db")
        try:
            clock = FakeClock()
            create_platform(store, clock)
            app = create_app(load_platform(store, clock), flush_period_s=3600)
            with TestClient(app) as client:
                response = client.get(OPENAPI)
        finally:
            store.close()
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def shape(path: str) -> str:
    """A path with its parameter names blanked: `/a/{x}` and `/a/{y}` are the same path."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def served() -> list[tuple[str, str]]:
    """(METHOD, path relative to /api/v1) for every operation in Muster's document."""
    return sorted(
        (method.upper(), path.removeprefix(BASE))
        for path, item in muster()["paths"].items()
        for method in item
        if method in METHODS
    )


def ece_operations() -> list[tuple[str, str]]:
    return [op for op in served() if not op[1].startswith(MUSTER_ONLY)]


def require_ece() -> dict[str, Any]:
    spec = ece()
    if spec is None:
        message = f"ECE's spec is not at {ECE_SPEC}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: the conformance check may not be skipped)")
        pytest.skip(message)
    return spec


def ece_operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    spec = require_ece()
    by_shape = {shape(p): p for p in spec["paths"]}
    assert shape(path) in by_shape, f"{path} is not in ECE's spec (nor in MUSTER_ONLY)"
    ece_path = by_shape[shape(path)]
    item = spec["paths"][ece_path]
    assert method.lower() in item, f"ECE has no {method} on {ece_path} (it has {sorted(item)})"
    operation: dict[str, Any] = item[method.lower()]
    return ece_path, operation


def muster_operation(method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = muster()["paths"][BASE + path][method.lower()]
    return operation


# -- schemas ---------------------------------------------------------------------------------------
def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow `$ref`s (`#/definitions/X` in ECE's, `#/components/schemas/X` in Muster's)."""
    seen: set[str] = set()
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        assert ref not in seen, f"$ref loop at {ref}"
        seen.add(ref)
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def types(doc: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The JSON types a schema allows ("any" when it does not say)."""
    schema = resolve(doc, schema)
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            return set().union(*(types(doc, s) for s in schema[combinator]))
    if "allOf" in schema:
        return set().union(*(types(doc, s) for s in schema["allOf"])) - {"any"} or {"any"}
    kind = schema.get("type")
    if isinstance(kind, list):
        return set(kind)
    if kind is None:
        return {"object"} if "properties" in schema else {"any"}
    return {kind}


def _widen(kinds: set[str]) -> set[str]:
    return kinds | {"integer"} if "number" in kinds else kinds


def object_schema(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any] | None:
    """The object member of a schema (skipping a `null` alternative), if it has properties."""
    schema = resolve(doc, schema)
    for combinator in ("anyOf", "oneOf", "allOf"):
        for member in schema.get(combinator, []):
            found = object_schema(doc, member)
            if found is not None:
                return found
    return schema if "properties" in schema else None


def compare(
    ece_doc: dict[str, Any],
    ece_schema: dict[str, Any],
    muster_doc: dict[str, Any],
    muster_schema: dict[str, Any],
    *,
    sends: bool,
    where: str,
) -> Iterator[str]:
    """Every way Muster's schema breaks ECE's. `sends`: Muster produces this value (a reply);
    otherwise Muster must accept whatever ECE's clients send (a request)."""
    ece_kinds, muster_kinds = types(ece_doc, ece_schema), types(muster_doc, muster_schema)
    if "any" not in ece_kinds and "any" not in muster_kinds:
        if sends and not (muster_kinds - {"null"}) <= _widen(ece_kinds):
            yield f"{where}: Muster sends {sorted(muster_kinds)}, ECE says {sorted(ece_kinds)}"
        if not sends and not ece_kinds <= _widen(muster_kinds):
            takes = sorted(muster_kinds)
            yield f"{where}: ECE clients send {sorted(ece_kinds)}, Muster takes {takes}"
    if "array" in ece_kinds and "array" in muster_kinds:
        ece_items = resolve(ece_doc, ece_schema).get("items")
        muster_items = next(
            (
                resolve(muster_doc, s).get("items")
                for s in [muster_schema, *resolve(muster_doc, muster_schema).get("anyOf", [])]
                if resolve(muster_doc, s).get("items")
            ),
            None,
        )
        if ece_items and muster_items:
            yield from compare(
                ece_doc, ece_items, muster_doc, muster_items, sends=sends, where=f"{where}[]"
            )
    ece_object = object_schema(ece_doc, ece_schema)
    muster_object = object_schema(muster_doc, muster_schema)
    if ece_object is None or muster_object is None:
        return
    muster_props = muster_object.get("properties", {})
    muster_required = set(muster_object.get("required", []))
    for name in ece_object.get("required", []):
        field = f"{where}.{name}"
        if name not in muster_props:
            yield f"{field}: ECE requires it, Muster's schema has no such field"
        elif sends and name not in muster_required:
            yield f"{field}: ECE requires it in the reply, Muster may leave it out"
        elif sends and "null" in types(muster_doc, muster_props[name]):
            yield f"{field}: ECE requires a value, Muster may send null"
    for name, ece_property in ece_object.get("properties", {}).items():
        if name in muster_props:
            yield from compare(
                ece_doc,
                ece_property,
                muster_doc,
                muster_props[name],
                sends=sends,
                where=f"{where}.{name}",
            )


def ece_body(operation: dict[str, Any]) -> dict[str, Any] | None:
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "body":
            schema: dict[str, Any] = parameter["schema"]
            return schema
    return None


def muster_body(operation: dict[str, Any]) -> dict[str, Any] | None:
    content = operation.get("requestBody", {}).get("content", {})
    schema: dict[str, Any] | None = content.get("application/json", {}).get("schema")
    return schema


def success(responses: dict[str, Any]) -> str:
    codes = sorted(code for code in responses if code.startswith("2"))
    assert codes, f"no success status among {sorted(responses)}"
    return codes[0]


# -- the checks ------------------------------------------------------------------------------------
def test_ece_operations_muster_must_serve_are_served() -> None:
    require_ece()
    missing = {
        (m, p) for m, p in REQUIRED if (m, shape(p)) not in {(m2, shape(p2)) for m2, p2 in served()}
    }
    assert not missing


def test_muster_only_operations_are_not_in_ece_spec() -> None:
    spec = require_ece()
    shapes = {shape(p) for p in spec["paths"]}
    clashes = [op for op in served() if op[1].startswith(MUSTER_ONLY) and shape(op[1]) in shapes]
    assert not clashes, "these are ECE paths: check them against ECE's spec"


def operation_params() -> list[Any]:
    return [
        pytest.param(
            method,
            path,
            id=f"{method} {path}",
            marks=[pytest.mark.xfail(strict=True, reason=DEPARTURES[method, path])]
            if (method, path) in DEPARTURES
            else [],
        )
        for method, path in ece_operations()
    ]


@pytest.mark.parametrize(("method", "path"), operation_params())
def test_operation_matches_ece(method: str, path: str) -> None:
    ece_path, ece_op = ece_operation(method, path)
    mine = muster_operation(method, path)
    spec, document = require_ece(), muster()
    problems: list[str] = []

    ece_status, muster_status = success(ece_op["responses"]), success(mine["responses"])
    if ece_status != muster_status:
        problems.append(f"success status: ECE {ece_status}, Muster {muster_status}")

    ece_request = ece_body(ece_op)
    muster_request = muster_body(mine)
    if ece_request is not None and muster_request is None:
        problems.append("ECE takes a request body, Muster's operation has none")
    if ece_request is not None and muster_request is not None:
        problems += compare(spec, ece_request, document, muster_request, sends=False, where="body")

    ece_reply = ece_op["responses"][ece_status].get("schema")
    content = mine["responses"][muster_status].get("content", {})
    muster_reply = content.get("application/json", {}).get("schema")
    if ece_reply is not None and muster_reply is None:
        problems.append(f"ECE documents a {ece_status} reply body, Muster's has none")
    if ece_reply is not None and muster_reply is not None:
        problems += compare(spec, ece_reply, document, muster_reply, sends=True, where="reply")

    declared = {h.lower() for h in mine["responses"][muster_status].get("headers", {})}
    for header in ece_op["responses"][ece_status].get("headers", {}):
        if header.lower() not in declared:
            problems.append(f"ECE's {ece_status} reply declares header {header}, Muster's not")

    assert not problems, f"{method} {ece_path}:\n  " + "\n  ".join(problems)


# -- live replies ----------------------------------------------------------------------------------
ALLOCATOR = "/platform/infrastructure/allocators/{allocator_id}"
RUNNER = "/platform/infrastructure/runners/{runner_id}"
PROXIES = "/platform/infrastructure/proxies"
COORDINATORS = "/platform/infrastructure/coordinators"
# (method, ECE path, body): called as admin on a platform with one allocator and proxy host,
# 10.0.0.1, whose proxy process runs, and a first host, 10.0.0.8, holding every role.
LIVE: list[tuple[str, str, Any]] = [
    ("GET", "/platform", None),
    ("GET", PROXIES, None),
    ("GET", PROXIES + "/health", None),
    ("GET", PROXIES + "/{proxy_id}", None),
    ("GET", COORDINATORS, None),
    ("GET", COORDINATORS + "/{coordinator_id}", None),
    ("POST", "/platform/infrastructure/allocators/_resync", None),
    ("POST", ALLOCATOR + "/_resync", None),
    ("POST", "/platform/infrastructure/runners/_resync", None),
    ("POST", RUNNER + "/_resync", None),
    ("GET", ALLOCATOR, None),
    ("GET", ALLOCATOR + "/metadata", None),
    ("GET", ALLOCATOR + "/settings", None),
    ("PUT", ALLOCATOR + "/settings", {"capacity": 4096}),
    # As ECE's Go SDK sends it: the merge patch as a JSON string.
    ("PATCH", ALLOCATOR + "/settings", '{"capacity": 8192}'),
    # ECE declares only 200: ids of no key of the caller's are skipped.
    ("DELETE", "/users/auth/keys", {"keys": ["no-such-key"]}),
]


def ece_validator(schema: dict[str, Any]) -> Any:
    spec = require_ece()
    return jsonschema_rs.Draft4Validator({**schema, "definitions": spec["definitions"]})


FIRST = "10.0.0.8"


def live_platform(client: TestClient, installed: Installed) -> None:
    """The hosts LIVE's calls run against: joined, heartbeating, 10.0.0.1 in maintenance."""
    token = create_token(client, installed, roles=list(ROLES))["token"]
    joined = join(
        client,
        token,
        "10.0.0.1",
        host_ip="10.0.0.1",
        zone="ece-zone-1",
        roles=["allocator", "proxy"],
    )
    assert joined.status_code == 200, joined.text
    # On SQLite only the first host may coordinate: it joins as `muster install` joins it.
    key = pki.generate_private_key()
    first = JoinRequest(
        token=token,
        csr_pem=pki.build_csr(key, FIRST),
        runner_id=FIRST,
        host_ip=FIRST,
        roles=ROLES,
        api_port=12443,
        first_host=True,
    )
    join_host(installed.platform, first, source="install")
    proxy = ProxyReport(running=True, routes_version="0123456789abcdef", backends=1)
    for runner_id in ("10.0.0.1", FIRST):
        principal = Principal(name=runner_id, role="runner", method="certificate")
        record_heartbeat(installed.platform, principal, HostReport(memory_mb=4096, proxy=proxy))
    maintenance = BASE + ALLOCATOR.format(allocator_id="10.0.0.1") + "/maintenance-mode/_start"
    assert client.post(maintenance, auth=installed.admin).status_code == 202


@pytest.mark.parametrize(("method", "path", "body"), LIVE, ids=[f"{m} {p}" for m, p, _ in LIVE])
def test_live_reply_holds_to_eces_schema_and_headers(
    client: TestClient, installed: Installed, method: str, path: str, body: Any
) -> None:
    _ece_path, operation = ece_operation(method, path)
    live_platform(client, installed)
    concrete = path.format(
        allocator_id="10.0.0.1", runner_id="10.0.0.1", proxy_id="10.0.0.1", coordinator_id=FIRST
    )
    response = client.request(method, BASE + concrete, json=body, auth=installed.admin)

    status = success(operation["responses"])
    assert str(response.status_code) == status, response.text
    declared = operation["responses"][status]
    missing = [h for h in declared.get("headers", {}) if h not in response.headers]
    assert not missing, f"ECE declares these headers, Muster did not send them: {missing}"
    if "schema" in declared:
        errors = [e.message for e in ece_validator(declared["schema"]).iter_errors(response.json())]
        assert not errors, f"{method} {path}: {errors}"


def test_live_417_of_proxies_health_holds_to_eces_schema(
    client: TestClient, installed: Installed
) -> None:
    _ece_path, operation = ece_operation("GET", PROXIES + "/health")
    live_platform(client, installed)
    installed.clock.advance(installed.platform.liveness.grace)  # every proxy disconnected
    response = client.get(BASE + PROXIES + "/health?expect_status=Yellow", auth=installed.admin)
    assert response.status_code == 417, response.text
    assert response.json()["status"] == "Red"
    schema = operation["responses"]["417"]["schema"]
    assert not [e.message for e in ece_validator(schema).iter_errors(response.json())]


def test_deleting_api_keys_skips_unknown_ids_and_deletes_the_rest(
    client: TestClient, installed: Installed
) -> None:
    keys = BASE + "/users/auth/keys"
    made = [
        client.post(keys, json={"description": f"k{n}"}, auth=installed.admin).json()["id"]
        for n in range(3)
    ]
    body = {"keys": [made[0], "no-such-key", made[1], made[0]]}
    response = client.request("DELETE", keys, json=body, auth=installed.admin)
    assert (response.status_code, response.json()) == (200, {})
    left = client.get(keys, auth=installed.admin).json()["keys"]
    assert [key["id"] for key in left] == [made[2]]


def test_live_check_finds_a_reply_that_breaks_eces_schema() -> None:
    validator = ece_validator({"$ref": "#/definitions/ModelVersionIndexSynchronizationResults"})
    assert not list(
        validator.iter_errors(
            {"results": {"1": {key: [] for key in ("created", "updated", "deleted", "errors")}}}
        )
    )
    assert list(validator.iter_errors({"results": {"1": {"created": []}}}))


# -- the checker itself ----------------------------------------------------------------------------
ECE_DOC = {
    "definitions": {
        "Reply": {
            "type": "object",
            "required": ["id", "items"],
            "properties": {
                "id": {"type": "string"},
                "items": {"type": "array", "items": {"$ref": "#/definitions/Item"}},
                "size": {"type": "number"},
            },
        },
        "Item": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
    }
}


def muster_doc(item_n: dict[str, Any], required: list[str], **extra: Any) -> dict[str, Any]:
    properties = {
        "id": {"type": "string"},
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
        **extra,
    }
    return {
        "components": {
            "schemas": {
                "Reply": {"type": "object", "required": required, "properties": properties},
                "Item": {"type": "object", "required": ["n"], "properties": {"n": item_n}},
            }
        }
    }


def check_reply(doc: dict[str, Any]) -> list[str]:
    return list(
        compare(
            ECE_DOC,
            {"$ref": "#/definitions/Reply"},
            doc,
            {"$ref": "#/components/schemas/Reply"},
            sends=True,
            where="reply",
        )
    )


def test_checker_accepts_a_superset() -> None:
    doc = muster_doc({"type": "integer"}, ["id", "items"], extra={"type": "string"})
    assert check_reply(doc) == []


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (muster_doc({"type": "integer"}, ["items"]), "reply.id: ECE requires it in the reply"),
        (muster_doc({"type": "string"}, ["id", "items"]), "reply.items[].n: Muster sends"),
        (
            muster_doc({"anyOf": [{"type": "integer"}, {"type": "null"}]}, ["id", "items"]),
            "reply.items[].n: ECE requires a value",
        ),
        (
            muster_doc({"type": "integer"}, ["id", "items"], size={"type": "boolean"}),
            "reply.size: Muster sends",
        ),
    ],
    ids=["dropped", "retyped-nested", "nullable-required", "retyped-optional"],
)
def test_checker_finds_breaks(doc: dict[str, Any], problem: str) -> None:
    assert any(p.startswith(problem) for p in check_reply(doc)), check_reply(doc)


def test_checker_allows_null_for_optional_fields() -> None:
    doc = muster_doc(
        {"type": "integer"},
        ["id", "items"],
        size={"anyOf": [{"type": "integer"}, {"type": "null"}]},
    )
    assert check_reply(doc) == []
