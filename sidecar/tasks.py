"""Owned background tasks: every task has a name and a reference until it ends.

Work that must not delay a caller's response (settling a reservation, probing a store) is
spawned here; shutdown waits for it (`aclose`), so nothing started is silently dropped.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

log = logging.getLogger("sidecar.tasks")
T = TypeVar("T")


class Tasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception(), extra={"task": task.get_name()})

    async def aclose(self, timeout: float = 5.0) -> None:
        """Waits up to `timeout` seconds for running tasks, then cancels what is left."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def __len__(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"<Tasks {sorted(t.get_name() for t in self._tasks)}>"


class Batcher(Generic[T]):
    """Collects items and hands them to `write` in batches: a named task writes what has
    gathered every `interval` seconds while anything waits, and `aclose` writes the rest.
    For work a caller must never wait for (usage records, audit records)."""

    def __init__(self, write: Callable[[list[T]], Awaitable[None]], interval: float, name: str) -> None:
        self._write = write
        self._interval = interval
        self._name = name
        self._pending: list[T] = []
        self._writer: asyncio.Task[None] | None = None
        self._tasks = Tasks()

    def add(self, item: T) -> None:
        self._pending.append(item)
        if self._writer is None or self._writer.done():
            self._writer = self._tasks.spawn(self._write_soon(), name=self._name)

    async def _write_soon(self) -> None:
        while self._pending:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            await self._write(batch)

    async def aclose(self) -> None:
        await self._tasks.aclose(timeout=1.0)
        await self.flush()

    def __len__(self) -> int:
        return len(self._pending)
