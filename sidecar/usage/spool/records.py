"""`SpoolRecords`: the spool's record path (append, settle, replay) and its state: what is
in which segment, what is full, and when segments are retired or dropped. `Spool` (core.py)
adds the writer task that puts the records on disk."""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sidecar.tasks import Tasks
from sidecar.telemetry.metrics import USAGE_RECORDS_DROPPED
from sidecar.usage.spool.format import FRAME, scan_segment
from sidecar.usage.spool.segments import DONE, IN_FLIGHT, WAITING, Segment, SegmentTable
from sidecar.usage.spool.syncer import Syncer
from sidecar.usage.spool.writer import Run, SegmentWriter

log = logging.getLogger("sidecar.usage.spool")

IDLE_ROLL_SECONDS = 10.0             # a fully acknowledged segment this old is replaced and deleted

Durability = Literal["interval", "strict"]
OnFull = Literal["reject", "drop_oldest"]


@dataclass
class Recovery:
    segments: int = 0
    records: int = 0           # records found on disk
    unsettled: int = 0         # of them, not below the checkpoint: they are replayed
    torn_tails: int = 0
    torn_bytes: int = 0
    checkpoint_problem: str = ""  # why the checkpoint could not be read ("" = it could, or there was none)


class SpoolRecords:
    """The record path and state of a `Spool`; all methods run on the event loop."""

    def __init__(self, directory: Path, *, durability: Durability, fsync_interval: float,
                 max_bytes: int, on_full: OnFull, segment_bytes: int, lock_fd: int) -> None:
        self.directory = directory
        self.durability = durability
        self.fsync_interval = fsync_interval
        self.max_bytes = max_bytes
        self.on_full = on_full
        # drop_oldest must be able to drop a part of the spool, never all of it at once
        self.segment_bytes = max(4096, min(segment_bytes, max_bytes // 8))
        self.recovery = Recovery()
        self.on_change: Any = None              # called when `refusing` changes
        self.source: Callable[[], None] | None = None     # appends what the owner queued (package doc)
        self.on_stored: Callable[[], None] | None = None  # IN_FLIGHT records may be `stored` now
        self.table = SegmentTable(directory)
        self.writer = SegmentWriter()
        self.syncer = Syncer(directory)
        self._lock_fd = lock_fd
        self._pending: list[Run] = []
        self._doomed: list[Path] = []
        self._batch: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._tasks = Tasks()
        self._write_failure = ""                # why the last append failed ("" = it did not)
        self._sync_failure = ""                 # why the last fsync failed
        self._epoch = 0                         # failed fsyncs so far
        self._flush_lock = asyncio.Lock()
        self._checkpointed = -1
        self._checkpointed_at = 0.0
        self._checkpoint: asyncio.Future[None] | None = None
        self._closing = False
        self._was_full = False
        self._all_settled: list[asyncio.Future[None]] = []  # `wait_settled` callers

    # --- the record path -------------------------------------------------------------------

    def append(self, payload: bytes, state: int) -> int:
        """Spools one record (written by the next batch) and returns its sequence."""
        size = FRAME.size + len(payload)
        if self.on_full == "drop_oldest":
            self._drop_oldest_for(size)
        segment = self._segment_for(size)
        seq = segment.first + segment.count
        segment.states.append(state)
        segment.times.append(time.time())
        if state == WAITING:
            segment.waiting += 1
        segment.size += size
        self.table.bytes += size
        self.table.next_seq = seq + 1
        run = self._pending[-1] if self._pending else None
        if run is None or run.segment is not segment or run.rewrite:
            run = Run(segment)
            self._pending.append(run)
        run.data += FRAME.pack(len(payload), zlib.crc32(payload))
        run.data += payload
        run.count += 1
        if not self._wake.is_set():
            self._wake.set()
        if self.table.bytes >= self.max_bytes or self._was_full:
            self._check_full()
        return seq

    def _segment_for(self, size: int) -> Segment:
        segment = self.table.last
        if (segment is None or segment.sealed or (segment.states and segment.size + size > self.segment_bytes)
                or (segment.states and segment.done == segment.count
                    and time.monotonic() - segment.created > IDLE_ROLL_SECONDS)):
            segment = self._new_segment()
        return segment

    def wake(self) -> None:
        """There is something to write (the owner queued records for `source`)."""
        if not self._wake.is_set():
            self._wake.set()

    def durable(self) -> asyncio.Future[None]:
        """Resolves when what has been appended so far is fsynced (strict durability waits on it)."""
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        return self._batch

    def stored(self, seq: int) -> bool | None:
        """Whether an IN_FLIGHT record is in its segment file: written (`interval`) or fsynced
        (`strict`). None when it is not IN_FLIGHT (settled, dropped, or handed back to replay)."""
        segment, index = self.table.find(seq)
        if segment is None or segment.states[index] != IN_FLIGHT:
            return None
        return index < self._on_disk(segment)

    def _on_disk(self, segment: Segment) -> int:
        return segment.synced if self.durability == "strict" else segment.written

    def ack(self, seq: int) -> None:
        """The record is settled: Kafka has it, or the dead-letter store does."""
        segment, index = self.table.find(seq)
        if segment is None or segment.states[index] == DONE:
            return
        if segment.states[index] == WAITING:
            segment.waiting -= 1
        segment.states[index] = DONE
        segment.done += 1
        if segment.done == segment.count and segment is not self.table.last:
            self._retire(segment)
        if self._all_settled and not self.table.unsettled():
            for waiter in self._all_settled:
                if not waiter.done():
                    waiter.set_result(None)
            self._all_settled.clear()

    async def wait_settled(self) -> None:
        """Returns once every record in the spool is settled (`sidecar spool replay` waits so)."""
        if not self.table.unsettled():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._all_settled.append(waiter)
        await waiter

    def set_waiting(self, seq: int) -> None:
        """Kafka did not take the record (yet): it is replayed from disk."""
        segment, index = self.table.find(seq)
        if segment is not None and segment.states[index] == IN_FLIGHT:
            segment.states[index] = WAITING
            segment.waiting += 1

    def set_in_flight(self, seq: int) -> bool:
        segment, index = self.table.find(seq)
        if segment is None or segment.states[index] != WAITING:
            return False
        segment.states[index] = IN_FLIGHT
        segment.waiting -= 1
        return True

    def requeue_in_flight(self) -> int:
        """Every IN_FLIGHT record becomes WAITING (the producer that had them is gone)."""
        return self.table.requeue_in_flight()

    async def waiting_records(self) -> AsyncIterator[tuple[int, bytes]]:
        """(sequence, payload) of WAITING records read back from their segment files (fsynced
        ones under `strict`), oldest first; each is still WAITING when it is yielded."""
        for segment in list(self.table.segments):
            if not segment.waiting or not self._on_disk(segment) or segment.removed:
                continue
            try:
                scan = await asyncio.to_thread(scan_segment, segment.path)
            except FileNotFoundError:
                continue  # dropped meanwhile (on_spool_full: drop_oldest)
            for index, payload in enumerate(scan.payloads[:self._on_disk(segment)]):
                if not segment.removed and segment.states[index] == WAITING:
                    yield segment.first + index, payload

    # --- state -----------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self.table.bytes

    @property
    def full(self) -> bool:
        return self.table.bytes >= self.max_bytes

    @property
    def write_error(self) -> str:
        """Why the disk refuses the spool's writes or fsyncs ("" while it does not)."""
        return self._write_failure or self._sync_failure

    @property
    def refusing(self) -> bool:
        """True while calls must be refused: `reject` and full, or the disk refuses writes."""
        return bool(self.write_error) or (self.on_full == "reject" and self.full)

    def unsettled(self) -> int:
        return self.table.unsettled()

    def waiting(self) -> int:
        return self.table.waiting()

    def oldest_age(self) -> float:
        """Seconds since the oldest unsettled record was spooled (0 when there is none)."""
        return self.table.oldest_age()

    def acked_below(self) -> int:
        return self.table.acked_below()

    def component(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "status": "failing" if self.refusing else "ok", "dir": str(self.directory),
            "durability": self.durability, "records": self.unsettled(), "waiting": self.waiting(),
            "bytes": self.table.bytes, "max_bytes": self.max_bytes,
            "oldest_age_seconds": round(self.oldest_age(), 3), "segments": len(self.table.segments),
            "on_full": self.on_full}
        if self.write_error:
            detail["write_error"] = self.write_error
        if self.recovery.torn_tails:
            detail["torn_tails_at_start"] = self.recovery.torn_tails
        if self.recovery.checkpoint_problem:
            detail["checkpoint_unreadable_at_start"] = self.recovery.checkpoint_problem
        return detail

    # --- segments --------------------------------------------------------------------------

    def _new_segment(self) -> Segment:
        previous = self.table.last
        if previous is not None:
            previous.sealed = True
            if previous.done == previous.count:
                self._retire(previous)
        return self.table.new_segment()

    def _retire(self, segment: Segment) -> None:
        """Forgets a settled segment; its file is deleted by the writer (after its pending writes)."""
        segment.sealed = True
        if segment.written < segment.count:
            return  # retired again when the writer has written it (see _flush)
        self.table.remove(segment)
        self._doomed.append(segment.path)
        self._wake.set()
        self._check_full()

    def _drop_oldest_for(self, needed: int) -> None:
        table = self.table
        while table.bytes + needed > self.max_bytes and table.segments:
            oldest = table.segments[0]
            if oldest is table.last:
                if not oldest.count:
                    return
                self._new_segment()
                if oldest.removed:
                    continue
            lost = oldest.count - oldest.done
            table.remove(oldest)
            self._pending = [run for run in self._pending if run.segment is not oldest]
            self._doomed.append(oldest.path)
            if lost:
                USAGE_RECORDS_DROPPED.labels("spool_full").inc(lost)
                log.error("spool full: dropped the oldest segment's unacknowledged records",
                          extra={"records": lost, "segment": oldest.path.name, "max_spool_bytes": self.max_bytes})

    def _check_full(self) -> None:
        refusing = self.refusing
        if refusing != self._was_full:
            self._was_full = refusing
            if refusing:
                log.error("usage spool cannot take more records: calls are refused", extra={
                    "bytes": self.table.bytes, "max_spool_bytes": self.max_bytes, "write_error": self.write_error})
            else:
                log.info("usage spool has room again: calls are accepted")
            if self.on_change is not None:
                self.on_change()
