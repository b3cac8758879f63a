"""The audit trail over the API: every token, key and sign-in event with who, when and from
where, never a secret; paged newest first, filtered by kind, admins only."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from muster.clock import FakeClock
from tests.conftest import TOKENS, Installed, create_token, join

AUDIT = "/api/v1/platform/audit"
KEYS = "/api/v1/users/auth/keys"


def events(client: TestClient, installed: Installed, **params: Any) -> list[dict[str, Any]]:
    response = client.get(AUDIT, params={"size": 1000, **params}, auth=installed.admin)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["events"]
    return found


def newest(client: TestClient, installed: Installed, kind: str) -> dict[str, Any]:
    found = events(client, installed, kind=kind)
    assert found, f"no {kind} event"
    return found[0]


# -- what is recorded --------------------------------------------------------------------------
def test_token_creation_is_recorded(client: TestClient, installed: Installed) -> None:
    token_id = create_token(client, installed, max_uses=2)["token_id"]
    event = newest(client, installed, "token.created")
    assert event["actor"] == "admin"
    assert event["source"] == "testclient"
    assert event["token_id"] == token_id
    assert event["at"] == "2026-01-01T00:00:00.000Z"
    assert event["outcome"] == "success"
    assert event["detail"] == {"roles": ["allocator"], "persistent": True, "max_uses": 2}


def test_token_use_is_recorded_with_the_runner(
    client: TestClient, installed: Installed, clock: FakeClock
) -> None:
    token_id = create_token(client, installed)["token_id"]
    token = create_token(client, installed)
    clock.advance(90)
    assert join(client, token["token"], "10.0.0.4").status_code == 200
    used = newest(client, installed, "token.used")
    assert used["token_id"] == token["token_id"] != token_id
    assert used["actor"] == "10.0.0.4"
    assert used["runner_id"] == "10.0.0.4"
    assert used["source"] == "testclient"
    assert used["at"] == "2026-01-01T00:01:30.000Z"
    assert used["detail"]["uses"] == 1
    joined = newest(client, installed, "runner.joined")
    assert joined["runner_id"] == "10.0.0.4"


@pytest.mark.parametrize("reason", ["revoked_token", "invalid_signature", "roles_not_granted"])
def test_refused_join_is_recorded_with_its_reason(
    client: TestClient, installed: Installed, reason: str
) -> None:
    created = create_token(client, installed)
    token = created["token"]
    extra: dict[str, Any] = {}
    if reason == "revoked_token":
        client.delete(f"{TOKENS}/{created['token_id']}", auth=installed.admin)
    elif reason == "invalid_signature":
        head, claims, _sig = token.split(".")
        token = f"{head}.{claims}.{'A' * 43}"
    else:
        extra["roles"] = ["director"]
    assert join(client, token, "10.0.0.6", **extra).status_code in (401, 403)
    refused = newest(client, installed, "token.refused")
    assert refused["outcome"] == f"enrollment_tokens.{reason}"
    assert refused["actor"] == "10.0.0.6"
    assert refused["source"] == "testclient"
    if reason != "invalid_signature":  # a forged token names no trustworthy id
        assert refused["token_id"] == created["token_id"]


def test_token_revocation_is_recorded(client: TestClient, installed: Installed) -> None:
    token_id = create_token(client, installed)["token_id"]
    client.delete(f"{TOKENS}/{token_id}", auth=installed.admin)
    event = newest(client, installed, "token.revoked")
    assert (event["actor"], event["token_id"], event["source"]) == ("admin", token_id, "testclient")


def test_api_key_creation_and_deletion_are_recorded(
    client: TestClient, installed: Installed
) -> None:
    key_id = client.post(KEYS, json={"description": "ci"}, auth=installed.admin).json()["id"]
    client.delete(f"{KEYS}/{key_id}", auth=installed.admin)
    created = newest(client, installed, "api_key.created")
    deleted = newest(client, installed, "api_key.deleted")
    for event in (created, deleted):
        assert event["actor"] == "admin"
        assert event["source"] == "testclient"
        assert event["detail"] == {"key_id": key_id}


def test_sign_ins_are_recorded(client: TestClient, installed: Installed) -> None:
    ok = client.post(
        "/api/v1/users/auth/_login",
        json=dict(zip(("username", "password"), installed.admin, strict=True)),
    )
    assert ok.status_code == 200
    bad = client.post("/api/v1/users/auth/_login", json={"username": "readonly", "password": "x"})
    assert bad.status_code == 401
    succeeded = newest(client, installed, "login.succeeded")
    failed = newest(client, installed, "login.failed")
    assert (succeeded["actor"], succeeded["source"]) == ("admin", "testclient")
    assert (failed["actor"], failed["source"]) == ("readonly", "testclient")
    assert failed["outcome"] == "root.unauthenticated"


def test_no_secret_ever_reaches_the_audit(
    client: TestClient, installed: Installed, clock: FakeClock
) -> None:
    secrets = [installed.admin[1], installed.readonly[1], *installed.bootstrap.tokens.values()]
    wrong = "Tr0ub4dor&3-wrong-password"
    secrets.append(wrong)
    client.get(TOKENS, auth=("admin", wrong))
    client.post("/api/v1/users/auth/_login", json={"username": "admin", "password": wrong})
    session = client.post(
        "/api/v1/users/auth/_login",
        json={"username": "admin", "password": installed.admin[1]},
    ).json()["token"]
    secrets.append(session)
    client.post("/api/v1/users/auth/_refresh", headers={"Authorization": f"Bearer {session}"})
    key = client.post(KEYS, json={"description": "ci"}, auth=installed.admin).json()
    secrets.append(key["key"])
    client.get(TOKENS, headers={"Authorization": f"ApiKey {key['key']}x"})
    for persistent in (True, False):
        created = create_token(client, installed, persistent=persistent)
        secrets.append(created["token"])
        join(client, created["token"], f"10.0.1.{int(persistent)}")
        join(client, created["token"], f"10.0.1.{int(persistent)}")  # refused: id taken
        client.delete(f"{TOKENS}/{created['token']}", auth=installed.admin)
        join(client, created["token"], "10.0.2.1")  # refused: revoked
    trail = client.get(AUDIT, params={"size": 1000}, auth=installed.admin).text
    assert json.loads(trail)["total"] >= 12
    for secret in secrets:
        assert secret not in trail
        for part in secret.split("."):
            if len(part) > 20:
                assert part not in trail
    with installed.platform.store.read() as tx:
        stored, _total = tx.list_audit(limit=1000)
    assert not [s for s in secrets if s in repr(stored)]


# -- reading the trail -------------------------------------------------------------------------
def make_events(client: TestClient, installed: Installed, clock: FakeClock, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        ids.append(create_token(client, installed)["token_id"])
        clock.advance(1)
    return ids


def test_trail_is_newest_first_and_paged(
    client: TestClient, installed: Installed, clock: FakeClock
) -> None:
    ids = make_events(client, installed, clock, 7)
    pages = []
    for offset in (0, 3, 6):
        response = client.get(
            AUDIT, params={"from": offset, "size": 3, "kind": "token.created"}, auth=installed.admin
        )
        body = response.json()
        assert (body["total"], body["from"], body["size"]) == (7, offset, 3)
        pages.append(body["events"])
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [e["token_id"] for page in pages for e in page] == ids[::-1]
    stamps = [e["at"] for page in pages for e in page]
    assert stamps == sorted(stamps, reverse=True)


def test_trail_filters_by_kind(client: TestClient, installed: Installed, clock: FakeClock) -> None:
    ids = make_events(client, installed, clock, 3)
    client.delete(f"{TOKENS}/{ids[0]}", auth=installed.admin)
    everything = client.get(AUDIT, auth=installed.admin).json()
    revoked = client.get(AUDIT, params={"kind": "token.revoked"}, auth=installed.admin).json()
    assert everything["total"] == 4
    assert [e["kind"] for e in everything["events"]] == ["token.revoked", *["token.created"] * 3]
    assert revoked["total"] == 1
    assert [e["token_id"] for e in revoked["events"]] == [ids[0]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"kind": "token.stolen"}, "kind"),
        ({"size": 0}, "size"),
        ({"size": 1001}, "size"),
        ({"from": -1}, "from"),
        ({"size": "ten"}, "size"),
    ],
    ids=["unknown-kind", "size-0", "size-too-big", "negative-from", "size-not-a-number"],
)
def test_bad_paging_is_a_400(
    client: TestClient, installed: Installed, params: dict[str, Any], field: str
) -> None:
    response = client.get(AUDIT, params=params, auth=installed.admin)
    assert response.status_code == 400
    [element] = response.json()["errors"]
    assert field in element["message"]
    assert response.headers["x-cloud-error-codes"] == element["code"]


def test_readonly_user_may_not_read_the_trail(client: TestClient, installed: Installed) -> None:
    response = client.get(AUDIT, auth=installed.readonly)
    assert response.status_code == 403
    assert response.json()["errors"][0]["code"] == "root.unauthorized.rbac"
    assert client.get(AUDIT).status_code == 401


def test_a_name_that_is_no_user_is_never_recorded(client: TestClient, installed: Installed) -> None:
    """A password typed into the user-name field stays out of the trail: an unknown name is
    recorded as a keyed digest, the same for the same text."""
    typed = installed.admin[1]
    client.get(TOKENS, auth=(typed, "x"))
    client.post("/api/v1/users/auth/_login", json={"username": typed, "password": "x"})
    client.post("/api/v1/users/auth/_login", json={"username": "nobody", "password": "x"})
    other, second, first = [e["actor"] for e in events(client, installed, kind="login.failed")]
    assert first == second != other
    assert first.startswith("unknown user ")
    assert other.startswith("unknown user ")
    trail = client.get(AUDIT, params={"size": 1000}, auth=installed.admin).text
    assert typed not in trail
    assert "nobody" not in trail


def test_each_refused_session_is_recorded_once(client: TestClient, installed: Installed) -> None:
    refused = client.post(
        "/api/v1/users/auth/_refresh", headers={"Authorization": "Bearer ms_" + "D" * 43}
    )
    assert refused.status_code == 401
    client.cookies.set("muster_session", "ms_" + "E" * 43)
    assert client.get(TOKENS).status_code == 401
    client.cookies.clear()
    failed = events(client, installed, kind="login.failed")
    assert [e["detail"]["method"] for e in failed] == ["session", "refresh"]
    assert {(e["actor"], e["source"]) for e in failed} == {("", "testclient")}
