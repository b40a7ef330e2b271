"""Start a coroutine now, in the caller, up to its first real wait; the rest runs as a task.

A new tap's port pass is started from the callback that reads its netlink event. Run as a
plain task, its first step (plan, then send the enslave) would wait until the event
callback had read the rest of a burst; started here, the enslave is on its way before the
next event is read. Python 3.12's eager tasks do the same; 3.11 has none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run coro until it first waits on a future. None if it finished meanwhile, else the
    task that carries it on. Exceptions of the first step are raised here."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_carry_on(coro, waiting))


async def _carry_on(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)  # a bare yield: one turn of the loop
            else:
                # What a Task does with a yielded future: wait until it is done, then
                # resume; the coroutine reads the outcome (result or error) itself.
                waiting._asyncio_future_blocking = False
                await waiting
        except asyncio.CancelledError:
            if waiting is None or not waiting.cancelled():
                # This task was cancelled, not the future: the coroutine is told.
                try:
                    waiting = coro.throw(asyncio.CancelledError())
                except StopIteration:
                    return
                continue
        except Exception:
            pass
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
