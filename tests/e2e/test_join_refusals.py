"""Every way `muster install --coordinator-host` refuses a host, through the real command: each
refusal has its own exit code and message, never prints the token, and records nothing (no
runner, no allocator, no token use). Plus the ways a token may be passed, and a second install
on one path."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from muster.errors import (
    EXIT_CODES,
    TOKEN_REFUSALS,
    AlreadyInstalledError,
    CAMismatchError,
    CoordinatorUnreachableError,
    RunnerIdTakenError,
)
from tests.conftest import Coordinator, Finished, free_port, run_muster, wait_until
from tests.e2e.conftest import join_args, join_no_start, jwt_part

EXIT_ALREADY_INSTALLED = EXIT_CODES[AlreadyInstalledError]
EXIT_CA_MISMATCH = EXIT_CODES[CAMismatchError]
EXIT_RUNNER_ID_TAKEN = EXIT_CODES[RunnerIdTakenError]
EXIT_UNREACHABLE = EXIT_CODES[CoordinatorUnreachableError]

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-join-refusals")]

TOKENS = "/api/v1/platform/configuration/security/enrollment-tokens"


def recorded(coordinator: Coordinator) -> dict[str, Any]:
    """Everything a join would change: runners, allocators, token uses and their audit."""
    audit = coordinator.audit()
    return {
        "runners": sorted(coordinator.runners()),
        "allocators": sorted(coordinator.allocators()),
        "uses": {tid: t.get("uses") for tid, t in coordinator.tokens().items()},
        "used": sorted(e["token_id"] for e in audit if e["kind"] == "token.used"),
        "joined": sorted(e["runner_id"] for e in audit if e["kind"] == "runner.joined"),
    }


def assert_nothing_leaked(result: Finished, token: str) -> None:
    assert token not in result.output
    if token.count(".") == 2 and len(token.split(".")[2]) > 16:
        assert token.split(".")[2] not in result.output  # not even the signature


def assert_not_installed(storage: Path) -> None:
    for left in ("host.json", "agent/key.pem", "agent/cert.pem", "agent/state.json"):
        assert not (storage / left).exists(), f"a refused install left {left} behind"


def forge(token: str, **claims: Any) -> str:
    """The token with some claims changed and the original signature kept."""
    header, _claims, signature = token.split(".")
    changed = {**jwt_part(token, 1), **claims}
    encoded = base64.urlsafe_b64encode(json.dumps(changed).encode()).rstrip(b"=").decode()
    return f"{header}.{encoded}.{signature}"


@dataclass(frozen=True)
class Refusal:
    """How to provoke one refusal, and what the command must say."""

    exit_code: int
    code: str
    message: str
    token: Callable[[Coordinator, Coordinator, Path], str]
    flags: Callable[[Coordinator, Coordinator], list[str]] = lambda _a, _b: []
    runner_id: str = "refused-host"
    target: str = "self"  # "other": send it to the second platform's coordinator


def _revoked(first: Coordinator, _other: Coordinator, _logs: Path) -> str:
    created = first.create_token()
    assert first.api("DELETE", f"{TOKENS}/{created['token_id']}").status_code == 200
    token: str = created["token"]
    return token


def _expired(first: Coordinator, _other: Coordinator, _logs: Path) -> str:
    token: str = first.create_token(persistent=False, validity_in_seconds=1)["token"]
    expires = jwt_part(token, 1)["exp"]
    wait_until(lambda: time.time() > expires + 1, timeout_s=5, what="the token's expiry")
    return token


def _exhausted(first: Coordinator, _other: Coordinator, logs: Path) -> str:
    token: str = first.create_token(max_uses=1)["token"]
    used = join_no_start(first, token, logs / "once", logs=logs, name="use-once", runner_id="once")
    assert used.returncode == 0, used.output
    return token


def _allocator_token(first: Coordinator, _other: Coordinator, _logs: Path) -> str:
    token: str = first.create_token(roles=["allocator"])["token"]
    return token


def _foreign(_first: Coordinator, other: Coordinator, _logs: Path) -> str:
    return other.secrets["allocator_only_token"]


def _tampered_roles(first: Coordinator, _other: Coordinator, _logs: Path) -> str:
    return forge(_allocator_token(first, _other, _logs), roles=["allocator", "coordinator"])


def _first_fingerprint(first: Coordinator, _other: Coordinator) -> list[str]:
    return ["--ca-fingerprint", first.secrets["ca_fingerprint"]]


REFUSALS = {
    "revoked": Refusal(
        TOKEN_REFUSALS["revoked_token"][1], "revoked_token", "was revoked", _revoked
    ),
    "expired": Refusal(TOKEN_REFUSALS["expired_token"][1], "expired_token", "expired at", _expired),
    "exhausted": Refusal(
        TOKEN_REFUSALS["exhausted_token"][1], "exhausted_token", "used 1 of 1 times", _exhausted
    ),
    "role-escalating": Refusal(
        TOKEN_REFUSALS["roles_not_granted"][1],
        "roles_not_granted",
        "does not grant coordinator",
        _allocator_token,
        flags=lambda _a, _b: ["--roles", "coordinator"],
    ),
    "foreign-signed": Refusal(
        TOKEN_REFUSALS["invalid_signature"][1],
        "invalid_signature",
        "not signed by this platform",
        _foreign,
        flags=_first_fingerprint,
    ),
    "tampered-roles": Refusal(
        TOKEN_REFUSALS["invalid_signature"][1],
        "invalid_signature",
        "not signed by this platform",
        _tampered_roles,
        flags=lambda _a, _b: ["--roles", "coordinator"],
    ),
    "malformed": Refusal(
        TOKEN_REFUSALS["malformed_token"][1],
        "malformed_token",
        "not a JWT",
        lambda _a, _b, _c: "not-a-roles-token",
    ),
    "ca-mismatch": Refusal(
        EXIT_CA_MISMATCH,
        "client.ca_mismatch",
        "not sending the token",
        _allocator_token,
        target="other",
    ),
    "runner-id-taken": Refusal(
        EXIT_RUNNER_ID_TAKEN,
        "runners.runner_id_taken",
        "'127.0.0.1' is already taken",
        _allocator_token,
        runner_id="127.0.0.1",  # the first host's own runner
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_refused_join_exits_with_its_own_code_and_records_nothing(
    case: str,
    coordinator: Coordinator,
    running_coordinator: Coordinator,
    tmp_path: Path,
) -> None:
    refusal = REFUSALS[case]
    token = refusal.token(coordinator, running_coordinator, tmp_path)
    target = running_coordinator if refusal.target == "other" else coordinator
    before = {"self": recorded(coordinator), "other": recorded(running_coordinator)}
    storage = tmp_path / "host"
    args = join_args(
        target,
        token,
        storage,
        runner_id=refusal.runner_id,
        extra=[*refusal.flags(coordinator, running_coordinator), "--no-start"],
    )

    result = run_muster(args, logs=tmp_path, name=case)

    assert result.returncode == refusal.exit_code, result.output
    assert refusal.code in result.stderr
    assert refusal.message in result.stderr
    assert "Traceback" not in result.output
    assert_nothing_leaked(result, token)
    assert_not_installed(storage)
    assert recorded(coordinator) == before["self"]
    assert recorded(running_coordinator) == before["other"]


def test_ca_mismatch_stops_before_the_token_reaches_the_other_coordinator(
    coordinator: Coordinator, running_coordinator: Coordinator, tmp_path: Path
) -> None:
    created = coordinator.create_token()
    result = run_muster(
        join_args(running_coordinator, created["token"], tmp_path / "host", extra=["--no-start"]),
        logs=tmp_path,
        name="mismatch",
    )
    assert result.returncode == EXIT_CA_MISMATCH, result.output
    # The other platform never saw the token: not refused, not used, not rate-counted.
    seen = [e for e in running_coordinator.audit() if e.get("token_id") == created["token_id"]]
    assert seen == []
    assert [e["kind"] for e in coordinator.audit() if e.get("token_id") == created["token_id"]] == [
        "token.created"
    ]


def test_unreachable_coordinator_exits_21_and_records_nothing(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    token = coordinator.create_token()["token"]
    before = recorded(coordinator)
    nobody = f"127.0.0.1:{free_port()}"
    args = join_args(coordinator, token, tmp_path / "host", extra=["--no-start"])
    args[args.index(coordinator.address)] = nobody

    result = run_muster(args, logs=tmp_path, name="unreachable")

    assert result.returncode == EXIT_UNREACHABLE, result.output
    assert "client.coordinator_unreachable" in result.stderr
    assert nobody in result.stderr
    assert_nothing_leaked(result, token)
    assert_not_installed(tmp_path / "host")
    assert recorded(coordinator) == before


def uses_of(coordinator: Coordinator, token_id: str) -> int:
    uses: int = coordinator.tokens()[token_id]["uses"]
    return uses


def test_token_read_from_a_file_joins_without_printing_it(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    created = coordinator.create_token()
    token_file = tmp_path / "roles-token"
    token_file.write_text(created["token"] + "\n")
    args = join_args(coordinator, "X", tmp_path / "host", runner_id="from-file")
    args[args.index("--roles-token") : args.index("--roles-token") + 2] = [
        "--roles-token-file",
        str(token_file),
    ]

    result = run_muster([*args, "--no-start"], logs=tmp_path, name="token-file")

    assert result.returncode == 0, result.output
    assert_nothing_leaked(result, created["token"])
    assert coordinator.runners()["from-file"]["roles"] == [{"role_name": "allocator"}]
    assert uses_of(coordinator, created["token_id"]) == 1


def test_token_read_from_stdin_joins_without_printing_it(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    created = coordinator.create_token()
    args = join_args(coordinator, "-", tmp_path / "host", runner_id="from-stdin")

    result = run_muster(
        [*args, "--no-start"], logs=tmp_path, name="token-stdin", stdin=created["token"] + "\n"
    )

    assert result.returncode == 0, result.output
    assert_nothing_leaked(result, created["token"])
    assert "from-stdin" in coordinator.allocators()
    assert uses_of(coordinator, created["token_id"]) == 1


def tree_digest(root: Path) -> str:
    """Names, modes and contents of everything under `root`."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(f"{path.relative_to(root)} {path.stat().st_mode:o}\n".encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_installing_twice_on_one_path_exits_3_and_changes_nothing(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    created = coordinator.create_token()
    storage = tmp_path / "host"
    first = join_no_start(
        coordinator, created["token"], storage, logs=tmp_path, name="first", runner_id="twice"
    )
    assert first.returncode == 0, first.output
    digest, before = tree_digest(storage), recorded(coordinator)

    again = join_no_start(
        coordinator, created["token"], storage, logs=tmp_path, name="again", runner_id="twice-2"
    )
    as_first_host = run_muster(
        ["install", "--no-start", "--host-storage-path", str(storage), "--host-ip", "127.0.0.1"],
        logs=tmp_path,
        name="again-first-host",
    )

    for result in (again, as_first_host):
        assert result.returncode == EXIT_ALREADY_INSTALLED, result.output
        assert "already holds a Muster installation" in result.stderr
        assert_nothing_leaked(result, created["token"])
    assert tree_digest(storage) == digest
    assert recorded(coordinator) == before
    assert uses_of(coordinator, created["token_id"]) == 1
