"""The failure limiter: a sliding window of failures per key (source address, token id)."""

from __future__ import annotations

import threading

from muster.domain.ratelimit import FailureLimiter, LoginLimits


def fail(limiter: FailureLimiter, key: str, times: int, *, at: float) -> None:
    for _ in range(times):
        limiter.record_failure(key, now_s=at)


def test_key_under_the_limit_may_try() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=60)
    fail(limiter, "10.0.0.1", 2, at=0.0)
    assert limiter.retry_after_s("10.0.0.1", now_s=0.0) == 0


def test_unknown_key_may_try() -> None:
    assert FailureLimiter(max_failures=1, window_s=60).retry_after_s("x", now_s=0.0) == 0


def test_key_at_the_limit_waits_until_the_oldest_failure_leaves_the_window() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=60)
    limiter.record_failure("10.0.0.1", now_s=10.0)
    limiter.record_failure("10.0.0.1", now_s=20.0)
    limiter.record_failure("10.0.0.1", now_s=30.0)
    assert limiter.retry_after_s("10.0.0.1", now_s=30.0) == 40
    assert limiter.retry_after_s("10.0.0.1", now_s=69.5) == 1
    assert limiter.retry_after_s("10.0.0.1", now_s=70.0) == 0


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    limiter = FailureLimiter(max_failures=1, window_s=10)
    limiter.record_failure("k", now_s=0.0)
    assert limiter.retry_after_s("k", now_s=0.2) == 10
    assert limiter.retry_after_s("k", now_s=9.99) == 1


def test_other_keys_are_untouched() -> None:
    limiter = FailureLimiter(max_failures=2, window_s=60)
    fail(limiter, "10.0.0.1", 5, at=0.0)
    assert limiter.retry_after_s("10.0.0.1", now_s=1.0) > 0
    assert limiter.retry_after_s("10.0.0.2", now_s=1.0) == 0


def test_window_slides_with_time() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=60)
    fail(limiter, "k", 2, at=0.0)
    limiter.record_failure("k", now_s=61.0)  # the first two left the window
    assert limiter.retry_after_s("k", now_s=61.0) == 0
    fail(limiter, "k", 2, at=62.0)
    assert limiter.retry_after_s("k", now_s=62.0) == 59


def test_key_stays_blocked_while_enough_failures_remain_in_the_window() -> None:
    limiter = FailureLimiter(max_failures=2, window_s=60)
    for at in (0.0, 30.0, 50.0):
        limiter.record_failure("k", now_s=at)
    assert limiter.retry_after_s("k", now_s=55.0) == 5
    assert limiter.retry_after_s("k", now_s=60.0) == 30  # 30 and 50 still count
    assert limiter.retry_after_s("k", now_s=90.0) == 0


def test_pruning_at_capacity_drops_only_stale_keys() -> None:
    limiter = FailureLimiter(max_failures=1, window_s=10, max_keys=3)
    limiter.record_failure("old-1", now_s=0.0)
    limiter.record_failure("old-2", now_s=0.0)
    limiter.record_failure("fresh", now_s=95.0)
    limiter.record_failure("new", now_s=100.0)  # full: stale keys are pruned first
    assert limiter.retry_after_s("fresh", now_s=100.0) == 5
    assert limiter.retry_after_s("new", now_s=100.0) == 10
    assert len(limiter._failures) == 2


def test_concurrent_failures_are_all_counted() -> None:
    limiter = FailureLimiter(max_failures=10_000, window_s=60)

    def hammer() -> None:
        fail(limiter, "k", 500, at=1.0)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(limiter._failures["k"]) == 4000


# -- LoginLimits: the window over the store's buckets ------------------------------------------
RULES = LoginLimits(window_s=60, bucket_s=10)


def test_fewer_than_the_limit_in_the_window_may_try() -> None:
    assert RULES.retry_after_s([], 3, now_s=1000.0) == 0
    assert RULES.retry_after_s([(990, 2)], 3, now_s=1000.0) == 0


def test_at_the_limit_waits_until_enough_of_the_oldest_buckets_leave() -> None:
    buckets = [(950, 1), (970, 2), (990, 1)]
    # 4 in the window, limit 3: the 950 bucket must leave (at 1010), then 3 remain < 4 ...
    assert RULES.retry_after_s(buckets, 4, now_s=1000.0) == 10
    # ... limit 2: 970 must leave too (at 1030).
    assert RULES.retry_after_s(buckets, 2, now_s=1000.0) == 30
    assert RULES.retry_after_s(buckets, 2, now_s=1030.0) == 0


def test_buckets_leave_the_window_a_window_after_they_start() -> None:
    assert RULES.retry_after_s([(940, 5)], 1, now_s=999.5) == 1
    assert RULES.retry_after_s([(940, 5)], 1, now_s=1000.0) == 0
    assert RULES.since(1000.0) == 950  # the oldest bucket still counted
    assert RULES.bucket(1009.9) == 1000
