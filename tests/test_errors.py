"""The exception tree (muster.errors): the tree drawn in its docstring is the classes' own; each
exit code is unique, stable and documented in the README; the client maps replies back to the
same classes."""

from __future__ import annotations

import re
from pathlib import Path

import httpx2 as httpx
import pytest

from muster import errors
from muster.client import error_from_response
from muster.domain.query import QueryError
from muster.errors import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_USAGE,
    TOKEN_REFUSALS,
    AlreadyInstalledError,
    CAMismatchError,
    ConflictError,
    CoordinatorUnreachableError,
    InvalidInputError,
    MusterError,
    NotFoundError,
    RunnerIdTakenError,
    StoreError,
    TokenRefusedError,
    exit_code_of,
)

README = Path(__file__).resolve().parents[1] / "README.md"
_DRAWN = re.compile(r"^(?P<indent>[ |]*(?:\+-- )?)(?P<name>[A-Z]\w+Error)\s+(?P<status>\d{3})?")


def drawn_tree() -> dict[str, tuple[str | None, int | None]]:
    """The docstring's tree: class name -> (parent's name, the status drawn beside it)."""
    tree: dict[str, tuple[str | None, int | None]] = {}
    parents: list[tuple[int, str]] = []  # (column of the name, name), innermost last
    for line in (errors.__doc__ or "").splitlines():
        match = _DRAWN.match(line)
        if match is None:
            continue
        column = len(match["indent"])
        while parents and parents[-1][0] >= column:
            parents.pop()
        tree[match["name"]] = (
            parents[-1][1] if parents else None,
            int(match["status"]) if match["status"] else None,
        )
        parents.append((column, match["name"]))
    return tree


def module_classes() -> dict[str, type[MusterError]]:
    found: dict[str, type[MusterError]] = {}
    pending: list[type[MusterError]] = [MusterError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def test_the_drawn_tree_lists_exactly_the_classes_with_their_parents() -> None:
    drawn = drawn_tree()
    classes = module_classes()
    assert sorted(drawn) == sorted(classes)
    for name, (parent, _status) in drawn.items():
        base = classes[name].__bases__[0]
        assert (base.__name__ if base is not Exception else None) == parent, name


def test_the_drawn_statuses_are_the_classes_statuses() -> None:
    classes = module_classes()
    for name, (_parent, status) in drawn_tree().items():
        if status is not None:
            assert classes[name].status == status, name


def test_every_exit_code_is_unique() -> None:
    codes = list(EXIT_CODES.values())
    assert len(codes) == len(set(codes))
    assert EXIT_ERROR not in codes
    assert set(TOKEN_REFUSALS) == {key for key in EXIT_CODES if isinstance(key, str)}
    assert {reason: code for reason, (_status, code) in TOKEN_REFUSALS.items()} == {
        key: code for key, code in EXIT_CODES.items() if isinstance(key, str)
    }


def test_the_documented_install_exit_codes_never_change() -> None:
    # README: "Exit codes of `muster install`": scripts depend on these numbers.
    assert {
        InvalidInputError: 2,
        AlreadyInstalledError: 3,
        "malformed_token": 10,
        "invalid_signature": 11,
        "unknown_token": 12,
        "revoked_token": 13,
        "expired_token": 14,
        "exhausted_token": 15,
        "roles_not_granted": 16,
        CAMismatchError: 20,
        CoordinatorUnreachableError: 21,
        RunnerIdTakenError: 22,
    }.items() <= EXIT_CODES.items()
    assert EXIT_USAGE == 2


def documented_exit_codes() -> set[int]:
    text = " ".join(README.read_text().split())  # paragraphs on one line
    codes: set[int] = set()
    for paragraph in re.findall(r"Exit codes of [^:]+:([^.]+)\.", text):
        codes |= {int(code) for code in re.findall(r"(?:^|,)\s*(\d+) [a-z]", paragraph)}
    return codes


def test_every_exit_code_is_documented_in_the_readme() -> None:
    documented = documented_exit_codes()
    assert {2, 3, 10, 16, 20, 22} <= documented  # the parse found the install paragraph
    assert {*EXIT_CODES.values(), EXIT_ERROR, EXIT_USAGE} <= documented


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInputError("bad flag"), 2),
        (QueryError("q: bad"), 2),  # a subclass elsewhere takes its base's code
        (AlreadyInstalledError("installed"), 3),
        (ConflictError("in the wrong state"), EXIT_ERROR),
        (RunnerIdTakenError("taken"), 22),
        (TokenRefusedError("expired_token", "expired"), 14),
        (TokenRefusedError("exhausted_token", "used up"), 15),
        (NotFoundError("no such token"), 6),
        (StoreError("down"), EXIT_ERROR),
        (MusterError("unexpected"), EXIT_ERROR),
    ],
)
def test_the_exit_code_follows_the_class(error: MusterError, code: int) -> None:
    assert exit_code_of(error) == code


def test_the_specific_conflicts_keep_their_wire_codes() -> None:
    assert RunnerIdTakenError("x").code == "runners.runner_id_taken"
    assert AlreadyInstalledError("x").code == "install.already_installed"
    assert RunnerIdTakenError("x").status == AlreadyInstalledError("x").status == 409


def reply(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"errors": [{"code": code, "message": "said the coordinator"}]}
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (409, "runners.runner_id_taken", RunnerIdTakenError),
        (409, "install.already_installed", AlreadyInstalledError),
        (409, "allocators.in_maintenance", ConflictError),
        (404, "root.resource_not_found", NotFoundError),
        (400, "root.invalid_input", InvalidInputError),
        (503, "root.store_unavailable", StoreError),
    ],
)
def test_the_client_maps_a_reply_back_to_the_class(
    status: int, code: str, cls: type[MusterError]
) -> None:
    error = error_from_response(reply(status, code))
    assert type(error) is cls
    assert error.code == code
    assert error.message == "said the coordinator"


def test_the_client_maps_a_refused_token_back_to_its_reason() -> None:
    error = error_from_response(reply(401, "enrollment_tokens.revoked_token"))
    assert isinstance(error, TokenRefusedError)
    assert error.reason == "revoked_token"
    assert exit_code_of(error) == 13
