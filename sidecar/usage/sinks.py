"""Where usage records go (`usage.sink`): `none`, `file` (JSON lines, rotated), or `kafka`
(kafka_sink.py: the write-ahead spool, then Kafka).

`submit` never does I/O on the caller's path: the record is queued and a named background task
writes it, in a worker thread. It returns an awaitable only under `usage.durability: strict`
(the call's response waits for its record to be on disk). `refusing()` is true while new calls
must be refused because their records could not be kept. Shutdown writes what is left.

A file that cannot be written (its directory gone or replaced, a full or read-only disk) loses
nothing at first: the records are held in memory and written again every second, the usage
component is `degraded` with the `write_error`, and a batch that failed half-way is cut back so
no line is ever half written or written twice. Beyond `max_held` records the oldest are dropped,
and at shutdown whatever is still held is lost: both are counted
(`api_router_usage_records_dropped_total{reason="file_unwritable"}`) and logged.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol

from sidecar.tasks import Batcher, Tasks
from sidecar.telemetry.metrics import USAGE_PUBLISH_SECONDS, USAGE_RECORDS_DROPPED, USAGE_RECORDS_PUBLISHED
from sidecar.usage.record import Usage

log = logging.getLogger("sidecar.usage")
BATCH_SECONDS = 0.05  # records of this long are written together
RETRY_SECONDS = 1.0   # a file that cannot be written is tried again this often
MAX_HELD = 100_000    # records held while the file cannot be written (~40 MB); older ones are dropped


class UsageSink(Protocol):
    name: str
    can_refuse: bool  # whether `refusing()` can ever be true

    async def start(self) -> None: ...

    def submit(self, usage: Usage) -> Awaitable[None] | None: ...

    def refusing(self) -> bool: ...

    def component(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class NoSink:
    """`usage.sink: none`: records are not kept (nothing is built for them)."""

    name = "none"
    can_refuse = False

    async def start(self) -> None:
        return None

    def refusing(self) -> bool:
        return False

    def submit(self, usage: Usage) -> None:
        return None

    def component(self) -> dict[str, Any]:
        return {"status": "ok", "sink": self.name}

    async def aclose(self) -> None:
        return None


class FileSink:
    """One JSON object per line (proto field names), in `path`; when it passes `max_bytes` it
    becomes `path.1` (`path.1` becomes `path.2`, ... up to `backups`) and a new file starts."""

    name = "file"
    can_refuse = False

    def __init__(self, path: Path, max_bytes: int, backups: int, max_held: int = MAX_HELD) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._batches = Batcher(self._write_batch, BATCH_SECONDS, name="usage-file-writer")
        self._max_held = max_held
        self._held: list[Usage] = []   # not written yet: the file refused them
        self._lock = asyncio.Lock()                     # one write at a time, in order
        self._tasks = Tasks()
        self._closing = asyncio.Event()
        self.write_error = ""                           # why the file cannot be written ("" = it can)
        self.written = 0
        self.dropped = 0

    async def start(self) -> None:
        """Opens the file once (creating its directory): a file that cannot be written shows at
        once, as a degraded component, not only with the first record."""
        try:
            await asyncio.to_thread(self._touch)
        except OSError as exc:
            self._failed(exc, 0)
            self._retry_soon()

    def _touch(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab"):
            pass

    def refusing(self) -> bool:
        return False

    def submit(self, usage: Usage) -> None:
        self._batches.add(usage)

    async def flush(self) -> None:
        await self._batches.flush()

    async def _write_batch(self, batch: list[Usage]) -> None:
        """Writes what is held, then `batch`; holds them all again when the file refuses them.
        With neither, checks that the file can be opened."""
        async with self._lock:
            records, self._held = self._held + batch, []
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self._write, records)
            except OSError as exc:
                self._failed(exc, len(records))
                self._hold(records)
                self._retry_soon()
                return
            USAGE_PUBLISH_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            if self.write_error:
                log.info("usage file writable again", extra={"path": str(self.path), "records": len(records)})
                self.write_error = ""

    def _write(self, batch: list[Usage]) -> None:
        lines = "".join(json.dumps(usage.json()) + "\n" for usage in batch).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size + len(lines) > self._max_bytes:
            self._rotate()
        with self.path.open("ab", buffering=0) as out:
            start = out.seek(0, os.SEEK_END)
            try:
                view = memoryview(lines)
                while view:
                    view = view[out.write(view) or 0:]
            except OSError:
                with contextlib.suppress(OSError):
                    out.truncate(start)  # no half line: the batch is written again whole
                raise
        self.written += len(batch)
        USAGE_RECORDS_PUBLISHED.labels(self.name).inc(len(batch))

    def _hold(self, records: list[Usage]) -> None:
        """Keeps records the file refused, at most `max_held`: older ones are dropped, counted."""
        over = len(records) - self._max_held
        if over > 0:
            self._drop(records[:over], "usage records dropped: too many held while the usage file cannot be "
                                       "written")
            records = records[over:]
        self._held = records

    def _drop(self, records: list[Usage], message: str) -> None:
        self.dropped += len(records)
        USAGE_RECORDS_DROPPED.labels("file_unwritable").inc(len(records))
        log.error(message, extra={"path": str(self.path), "records": len(records), "error": self.write_error})

    def _failed(self, exc: OSError, records: int) -> None:
        if not self.write_error:
            log.error("usage file cannot be written; records are held and retried",
                      extra={"path": str(self.path), "error": str(exc), "held": records})
        self.write_error = f"{type(exc).__name__}: {exc.strerror or exc}"

    def _retry_soon(self) -> None:
        if not self._closing.is_set() and not len(self._tasks):
            self._tasks.spawn(self._retry(), name="usage-file-retry")

    async def _retry(self) -> None:
        """Tries the file every RETRY_SECONDS until it takes what is held (shutdown ends it
        between two tries, never in the middle of a write)."""
        while self._held or self.write_error:
            try:
                await asyncio.wait_for(self._closing.wait(), RETRY_SECONDS)
                return
            except TimeoutError:
                pass
            await self._write_batch([])

    def _rotate(self) -> None:
        for index in range(self._backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if index == self._backups:
                older.unlink(missing_ok=True)
            else:
                newer = self.path.with_name(f"{self.path.name}.{index + 1}")
                if older.exists():
                    older.replace(newer)
        if self._backups:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()

    def component(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"status": "degraded" if self.write_error else "ok", "sink": self.name,
                                  "path": str(self.path), "written": self.written, "held": len(self._held),
                                  "dropped": self.dropped}
        if self.write_error:
            detail["write_error"] = self.write_error
        return detail

    async def aclose(self) -> None:
        """Writes what is queued and held; what the file still refuses is lost (counted, logged)."""
        self._closing.set()
        await self._tasks.aclose()
        await self._batches.aclose()
        if self._held:
            await self._write_batch([])
        if self._held:
            self._drop(self._held, "usage records lost: the usage file cannot be written")
            self._held = []

    def __repr__(self) -> str:
        return (f"<FileSink {self.path} written={self.written} pending={len(self._batches)} "
                f"held={len(self._held)}>")
