"""router.proxy.Deadline: asyncio.timeout for one await, told apart from other cancellations.

No sleeps for synchronisation: each await is on a future that only the test resolves, or never.
"""

from __future__ import annotations

import asyncio
import contextlib

from router.proxy import Deadline


async def wait_under_deadline(never: asyncio.Future[None], seconds: float) -> str:
    task = asyncio.current_task()
    assert task is not None
    deadline = Deadline(task, seconds)
    try:
        await never
    except asyncio.CancelledError:
        if not deadline.expired():
            raise
        return "deadline"
    finally:
        deadline.cancel()
    return "done"


async def test_the_deadline_ends_the_wait_and_the_task_goes_on() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait_under_deadline(never, 0.01))
    assert await task == "deadline"
    assert task.cancelling() == 0  # taken back: nothing left to cancel the task later


async def test_an_answer_in_time_disarms_it() -> None:
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait_under_deadline(answer, 0.01))
    await asyncio.sleep(0)  # let it start waiting
    answer.set_result(None)
    assert await task == "done"
    # past its time the disarmed timer cancels nothing: wait on a fresh future beyond it
    later: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.05, later.set_result, None)
    await later
    assert task.cancelling() == 0


async def test_someone_elses_cancellation_is_not_taken_for_the_deadline() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait_under_deadline(never, 60))
    await asyncio.sleep(0)
    task.cancel()  # the client went away
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_cancellation_on_top_of_the_deadline_still_cancels() -> None:
    """Both at once (the deadline fired, and the shutdown cancels too): the outer one wins."""
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait_under_deadline(never, 0))
    await asyncio.sleep(0)  # waiting now, its deadline due in the loop's next turn
    task.cancel()  # whichever comes first, the outer cancellation is kept
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
