"""``keep_until_done``: a task is held by its owner's set while it runs, and dropped once done."""

from __future__ import annotations

import asyncio

import pytest

from routesvc.tasks import keep_until_done


class TestKeepUntilDone:
    async def test_a_task_is_held_while_it_runs_and_dropped_when_it_ends(self) -> None:
        """The set holds the running task; once it has returned (and its callbacks run) it is gone."""
        release = asyncio.Event()

        async def work() -> int:
            await release.wait()
            return 7

        tasks: set[asyncio.Task[int]] = set()
        task = asyncio.get_running_loop().create_task(work())
        keep_until_done(task, tasks)
        await asyncio.sleep(0)
        assert tasks == {task}
        release.set()
        assert await task == 7
        await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
        assert tasks == set()

    async def test_a_failed_or_cancelled_task_is_dropped_too(self) -> None:
        """A task that raised or was cancelled is no longer held either."""

        async def fail() -> None:
            raise ValueError("boom")

        tasks: set[asyncio.Task[None]] = set()
        failed = asyncio.get_running_loop().create_task(fail())
        cancelled = asyncio.get_running_loop().create_task(asyncio.sleep(60))
        keep_until_done(failed, tasks)
        keep_until_done(cancelled, tasks)
        cancelled.cancel()
        with pytest.raises(ValueError, match="boom"):
            await failed
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await asyncio.sleep(0)
        assert tasks == set()
