"""`Spool`: the writer task that puts records on disk, on top of the record path
(`SpoolRecords`); see the package docstring for the guarantees."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial

from sidecar.telemetry.metrics import USAGE_RECORDS_BUFFERED
from sidecar.usage.spool.records import (
    IDLE_ROLL_SECONDS,
    Durability,
    OnFull,
    Recovery,
    SpoolRecords,
)
from sidecar.usage.spool.writer import Run, Written

log = logging.getLogger("sidecar.usage.spool")

CHECKPOINT_SECONDS = 1.0
WRITE_RETRY_SECONDS = 1.0

__all__ = ["CHECKPOINT_SECONDS", "IDLE_ROLL_SECONDS", "WRITE_RETRY_SECONDS", "Durability", "OnFull", "Recovery",
           "Spool"]


@dataclass(eq=False)
class _SyncAsk:
    """One fsync ask of the writer: what it covers, and who waits for it."""

    epoch: int                       # asks of an older epoch were overtaken by a failed fsync
    upto: int                        # the writer's runs up to this serial
    done: asyncio.Future[None] | None
    answered: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Spool(SpoolRecords):
    """Owns a spool directory; use `open_spool`. All methods run on the event loop; fsyncs and
    the checkpoint run in the sync thread."""

    # --- the writer ------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.spawn(self._write_loop(), name="spool-writer")

    async def _write_loop(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), CHECKPOINT_SECONDS)
            except TimeoutError:
                pass
            if self.durability == "interval" and self._wake.is_set() and not self._closing:
                await asyncio.sleep(self.fsync_interval)
            async with self._flush_lock:  # not `flush()`: the writer never waits for the checkpoint
                await self._flush()

    async def flush(self) -> None:
        """Appends what is pending and has it fsynced (under `strict`, waits for the fsync),
        deletes retired segments, and writes the checkpoint when it is due (waits for that)."""
        async with self._flush_lock:
            await self._flush()
        if self._checkpoint is not None:
            await asyncio.shield(self._checkpoint)

    async def _flush(self) -> None:
        if self.source is not None:
            self.source()
        self._wake.clear()
        batch, self._pending = self._pending, []
        done, self._batch = self._batch, None
        result = self.writer.write(batch)
        for run in batch[:result.runs]:
            run.segment.written += run.count
        USAGE_RECORDS_BUFFERED.inc(result.frames)
        self._delete_doomed()
        self._write_checkpoint()
        if result.error is not None:
            await self._write_failed(batch[result.runs:], result, done)
            return
        if self._write_failure:
            log.info("usage spool writes again")
            self._write_failure = ""
            self._check_full()
        self._retire_written(batch)
        await self._sync(result, done)
        if self.durability == "interval" and self.on_stored is not None:
            self.on_stored()

    async def _write_failed(self, unwritten: list[Run], result: Written, done: asyncio.Future[None] | None) -> None:
        """Keeps what could not be written for the next try (in a second): nothing is lost, the
        disk's refusal is reported (`write_error`, calls refused) until a write succeeds."""
        self._pending = unwritten + self._pending
        self._ask_sync(result, None)  # what was appended before the error
        self._carry(done)
        exc = result.error
        assert exc is not None
        if not self._write_failure:
            log.error("usage spool write failed; retrying", extra={"error": str(exc)})
        self._write_failure = f"{type(exc).__name__}: {exc.strerror or exc}"
        self._check_full()
        if self.durability == "interval" and self.on_stored is not None:
            self.on_stored()  # the runs written before the error
        await asyncio.sleep(WRITE_RETRY_SECONDS)
        self._wake.set()

    def _retire_written(self, batch: list[Run]) -> None:
        """Settled segments whose last records were just written, and an idle, settled last
        segment (the next record starts a new one), are retired."""
        for segment in {id(run.segment): run.segment for run in batch}.values():
            if segment.sealed and segment.done == segment.count and not segment.removed:
                self._retire(segment)
        last = self.table.last
        if (last is not None and last.count and last.done == last.count and last.written == last.count
                and time.monotonic() - last.created > IDLE_ROLL_SECONDS):
            self._retire(last)

    def _delete_doomed(self) -> None:
        """Deletes the files of retired segments; what cannot be deleted is tried again next batch."""
        doomed, self._doomed = self._doomed, []
        self.syncer.close_all(self.writer.forget(doomed))
        for at, path in enumerate(doomed):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                self._doomed = doomed[at:] + self._doomed
                log.warning("usage spool housekeeping failed; retrying", extra={"error": str(exc)})
                return

    def _write_checkpoint(self) -> None:
        """Asks the sync thread to write the checkpoint, at most once a second (and at close)."""
        if not self._closing and time.monotonic() - self._checkpointed_at < CHECKPOINT_SECONDS:
            return
        acked_below = self.acked_below()
        if acked_below == self._checkpointed:
            return
        self._checkpointed, self._checkpointed_at = acked_below, time.monotonic()
        written = asyncio.get_running_loop().create_future()
        self._checkpoint = written
        self.syncer.checkpoint(acked_below, partial(self._checkpoint_written, written))

    def _checkpoint_written(self, written: asyncio.Future[None], error: OSError | None) -> None:
        if error is not None:
            self._checkpointed = -1  # written again with the next batch that is due
            log.warning("usage spool housekeeping failed; retrying", extra={"error": str(error)})
        if not written.done():
            written.set_result(None)
        if self._checkpoint is written:
            self._checkpoint = None

    async def _sync(self, result: Written, done: asyncio.Future[None] | None) -> None:
        """Has what `write` appended fsynced; `done` resolves when it is. Under `strict` the
        writer waits for the fsync: what arrives meanwhile shares the next one."""
        if not result.fds and not result.directory and done is None:
            self.syncer.close_all(result.closes)
            return
        answered = self._ask_sync(result, done)
        if self.durability == "strict":
            await answered

    def _ask_sync(self, result: Written, done: asyncio.Future[None] | None) -> asyncio.Future[None]:
        ask = _SyncAsk(self._epoch, self.writer.serial, done)
        self.syncer.sync(result.fds, result.directory, partial(self._synced, ask))
        self.syncer.close_all(result.closes)
        return ask.answered

    def _synced(self, ask: _SyncAsk, error: OSError | None) -> None:
        """The sync thread's answer to `ask`, on the loop."""
        if ask.epoch != self._epoch:
            self._carry(ask.done)  # a failed fsync came first: what this ask covered is written again
        elif error is not None:
            self._fsync_failed(error, ask.done)
        else:
            self.writer.confirm(ask.upto)
            if self._sync_failure:
                log.info("usage spool fsyncs again")
                self._sync_failure = ""
                self._check_full()
            if ask.done is not None and not ask.done.done():
                ask.done.set_result(None)
            if self.durability == "strict" and self.on_stored is not None:
                self.on_stored()
        if not ask.answered.done():
            ask.answered.set_result(None)

    def _fsync_failed(self, error: OSError, done: asyncio.Future[None] | None) -> None:
        """What no fsync confirmed may not be on disk, whatever later fsyncs say: it is written
        again from memory, and whoever waits for it waits for that rewrite's fsync."""
        self._epoch += 1
        rewrite = self.writer.take_unsynced()
        self._pending = rewrite + self._pending
        self._carry(done)
        if not self._sync_failure:
            log.error("usage spool fsync failed: what was appended since the last good fsync is written again",
                      extra={"error": str(error), "records": sum(run.count for run in rewrite)})
        self._sync_failure = f"{type(error).__name__}: {error.strerror or error}"
        self._check_full()
        self._wake.set()

    def _carry(self, done: asyncio.Future[None] | None) -> None:
        """The batch behind `done` was not made durable: it resolves with the next batch."""
        if done is None:
            return
        if self._batch is None:
            self._batch = done
        else:
            self._batch.add_done_callback(partial(_follow, done))

    async def aclose(self) -> None:
        """Writes and fsyncs what is pending and releases the directory."""
        self._closing = True
        self._wake.set()
        await self._tasks.aclose(timeout=5.0)
        last = self.table.last
        if last is not None and last.done == last.count:
            self._retire(last)  # everything is settled: nothing to recover next time
        for _ in range(3):
            await self.flush()
            await self._ask_sync(Written(), None)  # every fsync asked has answered (a failure re-pends)
            if not self._pending:
                break
        self.syncer.close_all(self.writer.close_all())
        await asyncio.to_thread(self.syncer.stop)
        os.close(self._lock_fd)

    def __repr__(self) -> str:
        return (f"<Spool {self.directory} segments={len(self.table.segments)} unsettled={self.unsettled()} "
                f"bytes={self.table.bytes}>")


def _follow(done: asyncio.Future[None], _batch: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
