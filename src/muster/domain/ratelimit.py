"""Per-key limits (source address, token id, runner): a sliding window of events, mostly
failures (failed sign-ins and joins, unexpected errors) and also costly successes (renewals).

A key that counted `max_failures` events within `window_s` is refused until the oldest leaves
the window; other keys are untouched. Success does not reset the window, so guessing between
correct answers gains nothing.
"""

from __future__ import annotations

import math
import threading
from collections import deque


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
