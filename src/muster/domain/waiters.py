"""Long polls parked on the event loop and woken by another thread: the proxies' wait for a new
routing table (muster.domain.routing) and each allocator's wait for its desired instances to
move (muster.domain.desired). A waiting request holds a future on its event loop, not a thread;
the thread that installs a change wakes the waiters of the keys that changed, one
`call_soon_threadsafe` per event loop however many wait there."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class Waiters(Generic[K]):
    """Waiters by key. `wait` checks its condition and parks under one lock, and `wake` takes
    the waiters under it after the change is installed: a change is never missed between the
    check and the parking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[K, set[_Waiter]] = {}
        self._closed = False

    def __len__(self) -> int:
        """How many keys have a waiter."""
        return len(self._waiting)

    async def wait(self, key: K, changed: Callable[[], bool], timeout_s: float) -> None:
        """Return once `changed()` holds (at once if it does now) and `wake` named `key`, or
        after `timeout_s`. `changed` is called under the lock: a read of memory, no I/O."""
        loop = asyncio.get_running_loop()
        waiter: _Waiter = (loop, loop.create_future())
        with self._lock:
            if self._closed or changed():
                return
            self._waiting.setdefault(key, set()).add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter[1], timeout_s)
        finally:
            with self._lock:
                parked = self._waiting.get(key)
                if parked is not None:
                    parked.discard(waiter)
                    if not parked:
                        del self._waiting[key]

    def wake(self, moved: Callable[[K], bool]) -> int:
        """Wake the waiters of every waiting key for which `moved(key)` holds (called under the
        lock, once per waiting key: keep it a lookup). Returns how many were woken."""
        with self._lock:
            keys = [key for key in self._waiting if moved(key)]
            woken = [waiter for key in keys for waiter in self._waiting.pop(key)]
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for loop, future in woken:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            # RuntimeError: that loop has closed, nobody waits there any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake_all, futures)
        return len(woken)

    def close(self) -> None:
        """Answer every parked waiter now, and every later `wait` at once: the server is
        stopping, and a long poll left parked would hold its shutdown until the graceful
        timeout (and be cancelled with an error then). Each poll answers with what it holds;
        its host asks again, of this coordinator once it is back or of another."""
        with self._lock:
            self._closed = True
        self.wake(lambda _key: True)


def _wake_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)
