"""The spool's fsync thread, so that the event loop never waits for the disk.

It runs what it is asked in order: fsync files (and the directory), close files, write the
checkpoint. Asks that pile up while the disk is slow are served together, so a file is fsynced
once for all of them. Every fsync ask and every checkpoint is answered on the loop (`reply`),
with the error or None.

Once an fsync of a file has failed, the later asks of the same group that need that file fail
too, without fsyncing it again: after a failed fsync Linux may have dropped the dirty pages and
reports the next fsync as a success, so only writing the data again can make it durable (the
spool does that when it gets the failure).

`fsync` is the function it calls for every fsync: a seam for tests that need a failing disk.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.usage.spool.format import fsync_dir, write_checkpoint

Reply = Callable[[OSError | None], None]


class Syncer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fsync: Callable[[int], None] = os.fsync
        self._asks: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def sync(self, fds: list[int], directory: bool, reply: Reply) -> None:
        """On the loop: fsync `fds` (and the directory), then `reply` on the loop."""
        self._start()
        self._asks.put(("sync", list(fds), directory, reply))

    def checkpoint(self, acked_below: int, reply: Reply) -> None:
        """On the loop: replace the checkpoint durably, then `reply` on the loop."""
        self._start()
        self._asks.put(("checkpoint", acked_below, reply))

    def close_all(self, fds: list[int]) -> None:
        """Closes the files after every fsync asked before (at once if the thread never ran)."""
        for fd in fds:
            if self._thread is None:
                os.close(fd)
            else:
                self._asks.put(("close", fd))

    def stop(self) -> None:
        """Blocking: serves what was asked, then ends the thread."""
        if self._thread is not None:
            self._asks.put(None)
            self._thread.join()

    def _start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="spool-sync", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            asks = [self._asks.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    asks.append(self._asks.get_nowait())
            synced: set[int] = set()
            failed: dict[int, OSError] = {}   # fds whose fsync failed in this group
            for ask in asks:
                if ask is None:
                    return
                self._serve(ask, synced, failed)

    def _serve(self, ask: tuple[Any, ...], synced: set[int], failed: dict[int, OSError]) -> None:
        kind = ask[0]
        if kind == "close":
            synced.discard(ask[1])
            failed.pop(ask[1], None)
            with contextlib.suppress(OSError):
                os.close(ask[1])
            return
        error: OSError | None = None
        try:
            if kind == "checkpoint":
                write_checkpoint(self.directory, ask[1], self.fsync)
            else:
                self._sync_files(ask[1], ask[2], synced, failed)
        except OSError as exc:
            error = exc
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(ask[-1], error)

    def _sync_files(self, fds: list[int], directory: bool, synced: set[int], failed: dict[int, OSError]) -> None:
        for fd in fds:
            if fd in failed:
                raise failed[fd]
            if fd not in synced:
                try:
                    self.fsync(fd)
                except OSError as exc:
                    failed[fd] = exc
                    raise
                synced.add(fd)
        if directory:
            fsync_dir(self.directory, self.fsync)
