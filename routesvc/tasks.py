"""Tasks kept referenced until they end.

The event loop holds only a weak reference to a task: one that nothing else refers to may be
collected before it ends. A task run on past its caller (a delete shielded from a cancellation, a
settle that outlives the request, a call every waiter left) is therefore kept in a set of its
owner's until it is done, which also lets the owner wait for the ones still running on close.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

_T = TypeVar("_T")


def keep_until_done(task: asyncio.Task[_T], tasks: set[asyncio.Task[_T]]) -> None:
    """Hold ``task`` in ``tasks`` until it is done (ended, failed or cancelled), then drop it."""
    tasks.add(task)
    task.add_done_callback(tasks.discard)
