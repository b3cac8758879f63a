"""Per-key limits (source address, token id, runner): a sliding window of events, mostly
failures (failed joins, unexpected errors) and also costly successes (renewals), kept in this
process; and the failed-sign-in limits (`LoginLimits`), whose counts live in the store.

A key that counted `max_failures` events within `window_s` is refused until the oldest leaves
the window; other keys are untouched. Success does not reset the window, so guessing between
correct answers gains nothing.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


class FailureLimiter:
    def __init__(self, *, max_failures: int, window_s: float, max_keys: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after_s(self, key: str, *, now_s: float) -> int:
        """0 if `key` may try now, else the whole seconds until it may."""
        with self._lock:
            window = self._failures.get(key)
            if window is None:
                return 0
            self._expire(window, now_s)
            if len(window) < self.max_failures:
                return 0
            return max(1, math.ceil(window[0] + self.window_s - now_s))

    def record_failure(self, key: str, *, now_s: float) -> None:
        self.record(key, now_s=now_s)

    def record(self, key: str, *, now_s: float) -> None:
        """Count one event for `key` at `now_s`."""
        with self._lock:
            if key not in self._failures and len(self._failures) >= self._max_keys:
                self._prune(now_s)
            window = self._failures.setdefault(key, deque())
            self._expire(window, now_s)
            window.append(now_s)

    def _expire(self, window: deque[float], now_s: float) -> None:
        while window and window[0] <= now_s - self.window_s:
            window.popleft()

    def _prune(self, now_s: float) -> None:
        for key in list(self._failures):
            self._expire(self._failures[key], now_s)
            if not self._failures[key]:
                del self._failures[key]
        if len(self._failures) >= self._max_keys:
            self._failures.clear()


# ---- failed sign-ins, counted in the store ----------------------------------------------------


@dataclass(frozen=True)
class LoginLimits:
    """The failed-sign-in limits, shared by every worker process and coordinator through the
    store (counts per key in buckets of `bucket_s` wall-clock seconds, `login_failures`).

    Passwords count per (address, user name), `per_name` within `window_s`, and per address
    across all names, `per_address` (so one address cannot walk through many names). Invalid
    API keys and session tokens count per address, `per_token_address`: past it only invalid
    ones are refused, a valid key or session always passes (256 random bits are not guessed).
    """

    per_name: int = 10
    per_address: int = 100
    per_token_address: int = 10
    window_s: int = 60
    bucket_s: int = 10

    def bucket(self, now_s: float) -> int:
        """The start of the bucket `now_s` (epoch seconds) counts in."""
        return int(now_s // self.bucket_s) * self.bucket_s

    def since(self, now_s: float) -> int:
        """The oldest bucket start still inside the window ending at `now_s`."""
        return self.bucket(now_s - self.window_s) + self.bucket_s

    def retry_after_s(self, buckets: Iterable[tuple[int, int]], limit: int, *, now_s: float) -> int:
        """0 if fewer than `limit` failures fall in the window, else whole seconds until enough
        buckets (start, count) have left it. A bucket counts while its start is inside the
        window: a failure is forgotten `window_s` after its bucket began, so up to `bucket_s`
        early, and no one waits longer than `window_s`."""
        live = sorted((start, n) for start, n in buckets if start > now_s - self.window_s)
        total = sum(n for _start, n in live)
        for start, n in live:
            if total < limit:
                break
            total -= n
            if total < limit:
                return max(1, math.ceil(start + self.window_s - now_s))
        return 0
