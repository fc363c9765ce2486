"""Background tasks: every one is referenced until it ends, and an unexpected end is logged, never silent.

`spawn` replaces asyncio.create_task (which ruff bans in the agent's code: a task nobody references may be
garbage-collected mid-flight, and its exception is lost). `supervise` keeps a loop running: an exception
is logged with its code and the loop restarts after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from agent.errors import Code, log_failure

T = TypeVar("T")
_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], name: str, owned: bool = False) -> asyncio.Task[T]:
    """Start `coro` as a task kept referenced until it ends. Unless `owned` (the caller awaits it and reads
    its result), an exception it ends with is logged as TASK_FAILED."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_running.discard)
    if not owned:
        task.add_done_callback(_log_end)
    return task


def _log_end(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log_failure(Code.TASK_FAILED, f"background task {task.get_name()} ended with an error: {exc!r}")


def supervise(factory: Callable[[], Awaitable[None]], name: str, first_delay: float = 1.0,
              max_delay: float = 30.0) -> asyncio.Task[None]:
    """Run `factory()` until it returns; an exception is logged and the loop restarts after a back-off."""

    async def loop() -> None:
        delay = first_delay
        while True:
            try:
                await factory()
                return
            except Exception as exc:  # whatever ended it, the loop must go on (and say why it restarted)
                log_failure(Code.TASK_FAILED, f"{name} failed and restarts in {delay:g}s: {exc!r}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    return spawn(loop(), name)


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended; its CancelledError stays here."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def running_tasks() -> int:
    return len(_running)
