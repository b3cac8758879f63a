"""The long polls' waiters: a change wakes only the keys that moved, and a stopping server
answers every parked poll at once (and any later one), instead of holding its shutdown."""

from __future__ import annotations

import asyncio

from muster.domain.waiters import Waiters


def test_a_wake_answers_only_the_keys_that_moved() -> None:
    async def scenario() -> tuple[bool, bool]:
        waiters: Waiters[str] = Waiters()
        moved = asyncio.create_task(waiters.wait("a", lambda: False, 30))
        still = asyncio.create_task(waiters.wait("b", lambda: False, 30))
        await asyncio.sleep(0)  # each task runs to its parking, which awaits nothing before
        assert len(waiters) == 2
        assert waiters.wake(lambda key: key == "a") == 1
        await asyncio.wait_for(moved, 5)
        done = still.done()
        still.cancel()
        return moved.done(), done

    assert asyncio.run(scenario()) == (True, False)


def test_close_answers_every_parked_poll_and_every_later_one_at_once() -> None:
    async def scenario() -> int:
        waiters: Waiters[str] = Waiters()
        parked = [asyncio.create_task(waiters.wait(key, lambda: False, 30)) for key in "abc"]
        await asyncio.sleep(0)
        assert len(waiters) == 3
        waiters.close()
        # Within a few loop turns, not at the 30 s timeout (wait_for would raise first).
        await asyncio.wait_for(asyncio.gather(*parked), 5)
        await asyncio.wait_for(waiters.wait("d", lambda: False, 30), 5)
        return len(waiters)

    assert asyncio.run(scenario()) == 0
