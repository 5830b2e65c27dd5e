"""Where usage records go (`usage.sink`): `none`, `file` (JSON lines, rotated), or `kafka`
(kafka_sink.py: the write-ahead spool, then Kafka).

`submit` never does I/O on the caller's path: the record is queued and a named background task
writes it, in a worker thread. It returns an awaitable only under `usage.durability: strict`
(the call's response waits for its record to be on disk). `refusing()` is true while new calls
must be refused because their records could not be kept. Shutdown writes what is left.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.tasks import Batcher
from sidecar.telemetry.metrics import USAGE_PUBLISH_SECONDS, USAGE_RECORDS_PUBLISHED

log = logging.getLogger("sidecar.usage")
BATCH_SECONDS = 0.05  # records of this long are written together


class UsageSink(Protocol):
    name: str
    can_refuse: bool  # whether `refusing()` can ever be true

    async def start(self) -> None: ...

    def submit(self, record: usage_pb2.UsageRecord) -> Awaitable[None] | None: ...

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

    def submit(self, record: usage_pb2.UsageRecord) -> None:
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

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        self._batches = Batcher(self._write_batch, BATCH_SECONDS, name="usage-file-writer")
        self.written = 0

    async def start(self) -> None:
        return None

    def refusing(self) -> bool:
        return False

    def submit(self, record: usage_pb2.UsageRecord) -> None:
        self._batches.add(record)

    async def flush(self) -> None:
        await self._batches.flush()

    async def _write_batch(self, batch: list[usage_pb2.UsageRecord]) -> None:
        started = time.perf_counter()
        await asyncio.to_thread(self._write, batch)
        USAGE_PUBLISH_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    def _write(self, batch: list[usage_pb2.UsageRecord]) -> None:
        lines = "".join(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True)) + "\n"
                        for r in batch)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size + len(lines) > self._max_bytes:
            self._rotate()
        with self.path.open("a") as out:
            out.write(lines)
        self.written += len(batch)
        USAGE_RECORDS_PUBLISHED.labels(self.name).inc(len(batch))

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
        return {"status": "ok", "sink": self.name, "path": str(self.path), "written": self.written}

    async def aclose(self) -> None:
        await self._batches.aclose()

    def __repr__(self) -> str:
        return f"<FileSink {self.path} written={self.written} pending={len(self._batches)}>"
