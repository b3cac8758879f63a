"""Every operation of the coordinator's own OpenAPI document, fuzzed as admin and as readonly
with valid and invalid input: no 5xx, no reply that breaks its documented schema or status
codes, and no state change from a refused request (nor from any readonly request)."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from muster.api.app import create_app
from tests.fuzz.conftest import REFUSAL_KINDS, FuzzTarget

HTTP_METHODS = ("get", "put", "post", "delete", "patch")

MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# Any user may change their own name, email and password (readonly too): the one write a
# readonly request may make. A fuzzed new password is put back at once, so the cases after it
# still sign in.
SELF_SERVICE = ("PATCH", "/api/v1/user")


def _cases() -> list[Any]:
    """(METHOD, path, mode) for every documented operation, read at collection time from an app
    whose platform is never touched (building the document needs no store). Invalid input is
    generated only where the operation takes some."""
    stub: Any = SimpleNamespace(region="ece-region")
    document = create_app(stub).openapi()
    cases = []
    for path, item in sorted(document["paths"].items()):
        for method in HTTP_METHODS:
            if method not in item:
                continue
            operation = item[method]
            # A bare string in the path cannot be made invalid: such operations get no
            # negative cases unless they also take a query or a body.
            takes_input = "requestBody" in operation or any(
                p["in"] != "path" for p in operation.get("parameters", [])
            )
            label = f"{method.upper()} {path}"
            for mode in MODES if takes_input else MODES[:1]:
                cases.append(pytest.param(method.upper(), path, mode, False, id=f"{label} {mode}"))
            if "{" in path:
                cases.append(
                    pytest.param(method.upper(), path, MODES[0], True, id=f"{label} seeded")
                )
    return cases


CASES = _cases()


def _settings(request: pytest.FixtureRequest) -> settings:
    # The option exists when pytest starts in tests/fuzz (`make fuzz`); absent, run short.
    long = bool(request.config.getoption("--fuzz-long", default=False))
    examples = int(os.environ.get("MUSTER_FUZZ_EXAMPLES", "300")) if long else 6
    return settings(
        max_examples=examples,
        derandomize=not long,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


def _exercise(case: Any, target: FuzzTarget, user: str) -> None:
    before = target.snapshot()
    audit_mark = target.last_audit_id()
    with target.platform.store.read() as tx:
        password_hash = tx.find_user(user).password_hash  # type: ignore[union-attr]
    # ST202 (a schema-valid request refused) is not a defect here: the domain refuses values the
    # schema cannot express (unknown roles, a validity for a persistent token, ...).
    try:
        response = case.call_and_validate(
            headers=target.basic(user), excluded_checks=[positive_data_acceptance]
        )
    finally:
        with target.platform.store.write() as tx:
            tx.update_user(user, password_hash=password_hash)
    self_service = (case.method, case.path) == SELF_SERVICE and response.status_code < 400
    if response.status_code >= 400 or (user == "readonly" and not self_service):
        assert target.snapshot() == before, (
            f"{case.method} {case.formatted_path} answered {response.status_code} as {user} "
            "and changed the store"
        )
        kinds = set(target.audit_kinds_after(audit_mark))
        assert kinds <= REFUSAL_KINDS, f"a refused request was audited as {kinds}"


@pytest.mark.parametrize("user", ["admin", "readonly"])
@pytest.mark.parametrize(("method", "path", "mode", "seeded"), CASES)
def test_operation_keeps_its_contract_and_refusals_change_nothing(
    method: str,
    path: str,
    user: str,
    mode: GenerationMode,
    seeded: bool,
    api_schema: Any,
    fuzz_target: FuzzTarget,
    request: pytest.FixtureRequest,
) -> None:
    operation = api_schema[path][method]
    names = {p.name for p in operation.path_parameters} if seeded else set()
    fixed = {name: fuzz_target.known[name] for name in names if name in fuzz_target.known}

    @_settings(request)
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed or None))
    def run(case: Any) -> None:
        _exercise(case, fuzz_target, user)

    run()
