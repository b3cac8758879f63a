"""`python -m bench.instances_poll`: what the allocators' parked long polls cost the thread that
refreshes the desired-instances versions (muster.domain.waiters, as InstanceVersions uses it).

--hosts long polls are parked on one event loop, one per allocator id; then, on another thread
as the refresher wakes them, one refresh in which no version moved, one in which --moved moved,
and the CPU time (`time.thread_time` of the waking thread) of each, and of the event loop's
answering the woken ones.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

from muster.domain.waiters import Waiters


async def _measure(hosts: int, moved: int) -> dict[str, float]:
    waiters: Waiters[str] = Waiters()
    versions = {f"allocator-{i}": 1 for i in range(hosts)}
    held = dict(versions)

    async def poll(aid: str) -> None:
        await waiters.wait(aid, lambda: versions[aid] != held[aid], 60)

    started = time.thread_time()
    tasks = [asyncio.create_task(poll(aid)) for aid in versions]
    await asyncio.sleep(0)  # each task runs to its wait: parked
    assert len(waiters) == hosts, len(waiters)
    parked_s = time.thread_time() - started
    figures: dict[str, float] = {"park_ms_per_1000": parked_s * 1000 / hosts * 1000}

    def refresh(label: str, move: int) -> None:
        before = dict(versions)
        for i in range(move):
            versions[f"allocator-{i}"] += 1
        at = time.thread_time()
        woken = waiters.wake(lambda aid: versions[aid] != before[aid])
        figures[f"{label}_ms"] = (time.thread_time() - at) * 1000
        figures[f"{label}_woken"] = woken

    thread = threading.Thread(target=refresh, args=("none_moved", 0))
    thread.start()
    await asyncio.to_thread(thread.join)
    thread = threading.Thread(target=refresh, args=("moved", moved))
    started = time.thread_time()
    thread.start()
    await asyncio.to_thread(thread.join)
    await asyncio.gather(*tasks[:moved])
    figures["loop_answer_ms"] = (time.thread_time() - started) * 1000
    for task in tasks[moved:]:
        task.cancel()
    await asyncio.gather(*tasks[moved:], return_exceptions=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instances_poll", description=__doc__)
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--moved", type=int, default=3)
    args = parser.parse_args()
    figures = asyncio.run(_measure(args.hosts, args.moved))
    print(f"{args.hosts} long polls parked, {args.moved} moved")
    print(f"parking: {figures['park_ms_per_1000']:.2f} ms CPU per 1,000 polls")
    print(f"refresh, nothing moved: {figures['none_moved_ms']:.2f} ms CPU in the waking thread")
    print(
        f"refresh, {int(figures['moved_woken'])} woken: {figures['moved_ms']:.2f} ms CPU in the "
        f"waking thread; {figures['loop_answer_ms']:.2f} ms CPU on the event loop to answer them"
    )


if __name__ == "__main__":
    main()
