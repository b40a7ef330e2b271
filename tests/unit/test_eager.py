"""start_eagerly: the first step runs in the caller, the rest as a task."""

from __future__ import annotations

import asyncio

import pytest

from kvmnetd.engine.eager import start_eagerly


async def test_the_first_step_runs_before_start_returns() -> None:
    steps: list[str] = []
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        steps.append("planned and sent")
        steps.append(f"acked {await gate}")

    task = start_eagerly(work())
    assert steps == ["planned and sent"] and task is not None and not task.done()
    gate.set_result(7)
    await task
    assert steps == ["planned and sent", "acked 7"]


async def test_a_coroutine_that_never_waits_needs_no_task() -> None:
    ran: list[int] = []

    async def work() -> None:
        ran.append(1)

    assert start_eagerly(work()) is None and ran == [1]


async def test_later_steps_see_failures_and_bare_yields() -> None:
    loop = asyncio.get_running_loop()
    failing: asyncio.Future[None] = loop.create_future()
    seen: list[str] = []

    async def work() -> None:
        try:
            await failing
        except OSError as e:
            seen.append(str(e))
        await asyncio.sleep(0)
        seen.append("after a turn of the loop")

    task = start_eagerly(work())
    assert task is not None
    failing.set_exception(OSError("refused"))
    await task
    assert seen == ["refused", "after a turn of the loop"]


async def test_a_lock_taken_by_another_is_waited_for() -> None:
    lock = asyncio.Lock()
    await lock.acquire()
    order: list[str] = []

    async def work() -> None:
        async with lock:
            order.append("second")

    task = start_eagerly(work())
    assert task is not None and order == []
    order.append("first")
    lock.release()
    await task
    assert order == ["first", "second"]


async def test_cancelling_the_task_cancels_the_coroutine() -> None:
    cleaned: list[bool] = []

    async def work() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            cleaned.append(True)

    task = start_eagerly(work())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_an_error_in_the_first_step_reaches_the_caller() -> None:
    async def work() -> None:
        raise ValueError("bad plan")

    with pytest.raises(ValueError, match="bad plan"):
        start_eagerly(work())
