"""When a refresher reads a whole table again: the store keeps cheap marks (counts, sums, the
latest times, computed by the database) that move with the rows a refresher reads; it reads
the rows only when the marks moved, and at least about every `every_s` whatever they say."""

from __future__ import annotations

import math
import random


class FullReads:
    """The marks of the last full read and when the next one is due anyway: `every_s` after
    it, give or take a fifth at random, so that different refreshers' full reads (and those of
    different processes) drift apart instead of falling in the same second."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._marks: tuple[object, ...] | None = None
        self._due = -math.inf

    def needed(self, marks: tuple[object, ...], now: float) -> bool:
        """Whether the rows must be read again: the marks moved, or the full read is due."""
        return marks != self._marks or now >= self._due

    def done(self, marks: tuple[object, ...], now: float) -> None:
        """The rows were read along with `marks` at `now` (monotonic seconds)."""
        self._marks = marks
        self._due = now + self.every_s * random.uniform(0.8, 1.2)  # noqa: S311 - jitter
