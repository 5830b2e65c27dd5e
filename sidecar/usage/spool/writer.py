"""Appending to segment files, on the event loop (a write() into the page cache: microseconds).

A batch is a list of runs: frames for one segment, one write() each. A failed append is rolled
back to where the run started, so a retry never leaves a half frame or a frame twice on disk.

The writer keeps every run it wrote until an fsync has confirmed it (`confirm`). When an fsync
fails, the data written since the last good one may be gone from the disk even though the file
reads back fine (Linux drops the dirty pages of a failed writeback and reports the next fsync as
a success), so `take_unsynced` hands those runs back to be written again: each segment's file is
cut where its unconfirmed data began and the runs are appended anew.
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.usage.spool.format import HEADER, MAGIC, write_all
from sidecar.usage.spool.segments import Segment


@dataclass(eq=False)
class Run:
    """Frames appended one after another to one segment, not written yet: one write()."""

    segment: Segment
    data: bytearray = field(default_factory=bytearray)
    count: int = 0
    rewrite: bool = False       # written before, and again after a failed fsync
    cut_to: int | None = None   # the file is cut here first (0: the header is written again too)
    start: int = 0              # where the run begins in the file (set when it is written)


@dataclass
class Written:
    """What one batch achieved."""

    fds: list[int] = field(default_factory=list)  # files appended to: they need an fsync
    directory: bool = False                    # a segment file was created: the directory too
    closes: list[int] = field(default_factory=list)  # files to close once they are fsynced
    runs: int = 0                              # runs of the batch on disk, in order
    frames: int = 0                            # the new frames they hold (rewrites not counted)
    error: OSError | None = None               # why the other runs are not


class SegmentWriter:
    def __init__(self) -> None:
        self.files: dict[Path, int] = {}       # open segment files (the one being appended to)
        self.serial = 0                        # runs written so far
        self._unsynced: deque[tuple[int, Run]] = deque()  # (serial, run) no fsync confirmed yet

    def write(self, batch: list[Run]) -> Written:
        """Appends the batch's runs in order (no fsync: the sync thread does that)."""
        result = Written()
        for run in batch:
            try:
                self._append(run, result)
            except OSError as exc:
                result.error = exc
                break
            self.serial += 1
            self._unsynced.append((self.serial, run))
            result.runs += 1
            result.frames += 0 if run.rewrite else run.count
        return result

    def _append(self, run: Run, result: Written) -> None:
        fd, created = self._open(run.segment, result)
        if run.cut_to is not None and not created:
            os.ftruncate(fd, run.cut_to)
            if run.cut_to == 0:
                write_all(fd, HEADER.pack(MAGIC, run.segment.first))
                result.directory = created = True
        start = os.fstat(fd).st_size
        try:
            write_all(fd, run.data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
        run.start = 0 if created else start    # a new file's header is not durable either
        if fd not in result.fds:
            result.fds.append(fd)

    def _open(self, segment: Segment, result: Written) -> tuple[int, bool]:
        """The segment's file for appending, and whether its header was written just now (a new
        file: the directory needs an fsync, with the batch's)."""
        fd = self.files.get(segment.path)
        if fd is not None:
            return fd, False
        for path in list(self.files):  # the writer appends to one segment at a time
            result.closes.append(self.files.pop(path))
        fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            created = os.fstat(fd).st_size == 0
            if created:
                write_all(fd, HEADER.pack(MAGIC, segment.first))
                result.directory = True
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
            raise
        self.files[segment.path] = fd
        return fd, created

    def confirm(self, upto: int) -> None:
        """An fsync confirmed every run up to serial `upto`."""
        while self._unsynced and self._unsynced[0][0] <= upto:
            run = self._unsynced.popleft()[1]
            run.segment.synced += run.count

    def take_unsynced(self) -> list[Run]:
        """After a failed fsync: every run no fsync confirmed, to be written again (the segments'
        `written` go back to what is confirmed; runs of removed segments are forgotten)."""
        runs: list[Run] = []
        cut: set[int] = set()
        for _, old in self._unsynced:
            segment = old.segment
            if segment.removed:
                continue
            segment.written -= old.count
            first = id(segment) not in cut
            cut.add(id(segment))
            runs.append(Run(segment, old.data, old.count, rewrite=True, cut_to=old.start if first else None))
        self._unsynced.clear()
        return runs

    def forget(self, paths: list[Path]) -> list[int]:
        """Files about to be deleted: their descriptors, to close once what was asked is fsynced."""
        return [fd for fd in (self.files.pop(path, -1) for path in paths) if fd >= 0]

    def close_all(self) -> list[int]:
        fds = list(self.files.values())
        self.files.clear()
        return fds
