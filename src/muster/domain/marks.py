"""When a refresher reads a whole table again: the store keeps cheap marks (counts, sums, the
latest times, computed by the database) that move with the rows a refresher reads; it reads
the rows only when the marks moved, and at least about every `every_s` whatever they say, or
every ROW_S per row read if that is longer."""

from __future__ import annotations

import math
import random

# The full read that comes whatever the marks say is a safety net: it is spaced by the rows it
# reads, so that it costs each process the same small share of a core at any fleet size (a
# read costs 2-4 µs of CPU a row: at 100,000 rows ~0.3 s, every 100 s rather than every 30).
ROW_S = 0.001
# The jitter's generator draws from the operating system: the refreshers draw from it in
# background threads (drawing from the random module's shared one moved its state under whatever
# else used it meanwhile), and a coordinator's workers are forked from one process, so a
# generator with a state of its own gave every worker the same draws, and every worker's full
# reads fell in the same second (docs/benchmarks.md, "100,000 connected hosts, third attempt").
_jitter = random.SystemRandom()


def jitter() -> float:
    """A factor between 0.8 and 1.2, drawn apart in every process, forked or not."""
    return _jitter.uniform(0.8, 1.2)


def safety_net_s(every_s: float, rows: int) -> float:
    """Seconds between full reads of `rows` rows that no mark asked for."""
    return max(every_s, rows * ROW_S)


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

    def done(self, marks: tuple[object, ...], now: float, rows: int = 0) -> None:
        """`rows` rows were read along with `marks` at `now` (monotonic seconds)."""
        self._marks = marks
        spacing = safety_net_s(self.every_s, rows)
        self._due = now + spacing * jitter()
