"""A refresher reads its rows again when the store's marks move, and otherwise as a safety net
about every `every_s` (give or take a fifth), spaced by the rows it read so that the net costs
the same share of a core at any fleet size."""

from __future__ import annotations

import multiprocessing

import pytest

from muster.domain.marks import ROW_S, FullReads, jitter, safety_net_s


def test_rows_are_read_again_when_the_marks_move_and_else_when_the_net_is_due() -> None:
    reads = FullReads(every_s=30.0)
    assert reads.needed((1, 2), now=0.0)  # never read
    reads.done((1, 2), now=0.0, rows=100)
    assert not reads.needed((1, 2), now=23.9)  # a fifth early at most
    assert reads.needed((1, 3), now=1.0)  # the marks moved
    assert reads.needed((1, 2), now=36.1)  # a fifth late at most


@pytest.mark.parametrize("rows", [0, 1_000, 30_000, 100_000, 1_000_000])
def test_the_safety_net_is_spaced_by_the_rows_read(rows: int) -> None:
    spacing = safety_net_s(30.0, rows)
    assert spacing == max(30.0, rows * ROW_S)
    reads = FullReads(every_s=30.0)
    reads.done(("m",), now=0.0, rows=rows)
    assert not reads.needed(("m",), now=spacing * 0.8 - 0.01)
    assert reads.needed(("m",), now=spacing * 1.2 + 0.01)


def test_at_100000_runners_the_certificates_net_comes_every_100_s() -> None:
    assert safety_net_s(30.0, 100_000) == pytest.approx(100.0)
    assert safety_net_s(30.0, 2_500) == 30.0  # small fleets: as before


def _draws(into: multiprocessing.SimpleQueue) -> None:  # type: ignore[type-arg]
    into.put([jitter() for _ in range(8)])


def test_forked_workers_draw_their_own_jitter() -> None:
    """A coordinator's workers are forked from one process: their safety nets must not fall due
    together, as they did when each inherited one generator's state."""
    fork = multiprocessing.get_context("fork")
    into = fork.SimpleQueue()
    workers = [fork.Process(target=_draws, args=(into,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    drawn = [into.get() for _ in workers]
    for worker in workers:
        worker.join()
    drawn.append([jitter() for _ in range(8)])
    assert all(0.8 <= x <= 1.2 for draws in drawn for x in draws)
    assert len({tuple(draws) for draws in drawn}) == 3
