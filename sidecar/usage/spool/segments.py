"""The spool's segments in memory: the state of every record, and what is on disk.

Each record is WAITING (on disk, Kafka has not got it), IN_FLIGHT (its owner has it: queued for
the producer, or in the producer) or DONE (acknowledged, or dead-lettered). A segment counts
its records three ways: appended (`count`), `written` to its file (in the page cache), and
`synced` (an fsync confirmed them). A segment file is deleted once it is sealed and all of its
records are DONE.
"""
from __future__ import annotations

import bisect
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.usage.spool.format import HEADER, segment_name

WAITING, IN_FLIGHT, DONE = 0, 1, 2


@dataclass(eq=False)
class Segment:
    first: int
    path: Path
    states: bytearray = field(default_factory=bytearray)   # one state per record
    times: array[float] = field(default_factory=lambda: array("d"))  # wall time each record was spooled
    size: int = HEADER.size      # bytes once everything appended is written
    written: int = 0             # records written to the file
    synced: int = 0              # of them, confirmed by an fsync
    done: int = 0
    waiting: int = 0
    low: int = 0                 # every record below this index is DONE
    sealed: bool = False
    removed: bool = False        # no longer the spool's: settled, or dropped (drop_oldest)
    created: float = field(default_factory=time.monotonic)

    @property
    def count(self) -> int:
        return len(self.states)

    def advance_low(self) -> int:
        while self.low < self.count and self.states[self.low] == DONE:
            self.low += 1
        return self.low


class SegmentTable:
    """The segments, oldest first, found by sequence; the bytes they account for (their files'
    sizes once everything appended is written); the next sequence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.segments: list[Segment] = []
        self._firsts: list[int] = []
        self.bytes = 0
        self.next_seq = 0

    @property
    def last(self) -> Segment | None:
        return self.segments[-1] if self.segments else None

    def add(self, segment: Segment) -> None:
        self.segments.append(segment)
        self._firsts.append(segment.first)
        self.bytes += segment.size

    def new_segment(self) -> Segment:
        segment = Segment(self.next_seq, self.directory / segment_name(self.next_seq))
        self.add(segment)
        return segment

    def remove(self, segment: Segment) -> None:
        at = self.segments.index(segment)
        del self.segments[at], self._firsts[at]
        self.bytes -= segment.size
        segment.removed = True

    def find(self, seq: int) -> tuple[Segment | None, int]:
        at = bisect.bisect_right(self._firsts, seq) - 1
        if at < 0:
            return None, 0
        segment = self.segments[at]
        index = seq - segment.first
        return (segment, index) if index < segment.count else (None, 0)

    def unsettled(self) -> int:
        return sum(s.count - s.done for s in self.segments)

    def waiting(self) -> int:
        return sum(s.waiting for s in self.segments)

    def oldest_age(self) -> float:
        """Seconds since the oldest unsettled record was spooled (0 when there is none)."""
        for segment in self.segments:
            low = segment.advance_low()
            if low < segment.count:
                return max(0.0, time.time() - float(segment.times[low]))
        return 0.0

    def acked_below(self) -> int:
        for segment in self.segments:
            low = segment.advance_low()
            if low < segment.count:
                return segment.first + low
        return self.next_seq

    def requeue_in_flight(self) -> int:
        """Every IN_FLIGHT record becomes WAITING; returns how many."""
        moved = 0
        for segment in self.segments:
            for index in range(segment.low, segment.count):
                if segment.states[index] == IN_FLIGHT:
                    segment.states[index] = WAITING
                    segment.waiting += 1
                    moved += 1
        return moved
