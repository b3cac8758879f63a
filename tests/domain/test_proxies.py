"""The proxies' health rules: the status a count of healthy proxies makes, the order in which
one status meets an expected one, and how ECE's `expect_status` is read."""

from __future__ import annotations

import pytest

from muster.domain.proxies import health_status, meets, parse_status
from muster.errors import InvalidInputError


@pytest.mark.parametrize(
    ("healthy", "total", "status"),
    [(0, 0, "Red"), (0, 3, "Red"), (1, 3, "Yellow"), (2, 3, "Yellow"), (3, 3, "Green")],
)
def test_status_is_green_when_all_yellow_when_some_red_when_none(
    healthy: int, total: int, status: str
) -> None:
    assert health_status(healthy, total) == status


def test_a_status_meets_its_own_and_every_worse_expectation() -> None:
    assert [meets("Yellow", e) for e in ("Green", "Yellow", "Red", None)] == [
        False,
        True,
        True,
        True,
    ]
    assert meets("Green", "Green")
    assert not meets("Red", "Yellow")


def test_expected_status_is_read_in_any_case_and_anything_else_is_refused() -> None:
    assert [parse_status(v) for v in ("green", " YELLOW ", "Red", None)] == [
        "Green",
        "Yellow",
        "Red",
        None,
    ]
    with pytest.raises(InvalidInputError) as refused:
        parse_status("amber")
    assert refused.value.code == "proxies.invalid_expect_status"
