"""Usage records and the file sink: event ids, rotation, shutdown writes the rest."""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from sidecar.usage.record import Usage, new_event_id
from sidecar.usage.sinks import FileSink


def test_event_ids_are_uuid7_unique_and_sort_by_time() -> None:
    ids = [new_event_id(1_700_000_000.0 + i / 1000) for i in range(1000)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == 1000 and ids == sorted(ids)
    assert new_event_id(1_700_000_000.0)[:13] == "018bcfe5-6800"  # the millisecond timestamp leads


def test_file_sink_rotates_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"

    async def run() -> FileSink:
        sink = FileSink(path, max_bytes=120, backups=2)
        for batch in range(6):
            for i in range(3):
                sink.submit(Usage(event_id=f"e{batch}-{i}", org="acme"))
            await sink.flush()
        sink.submit(Usage(event_id="last", org="acme"))
        await sink.aclose()  # writes what is still queued
        return sink

    sink = asyncio.run(run())
    assert sink.written == 19
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["usage.jsonl", "usage.jsonl.1", "usage.jsonl.2"]  # older ones were dropped
    assert all(p.stat().st_size <= 120 for p in tmp_path.iterdir())
    newest = [json.loads(line) for line in path.read_text().splitlines()]
    assert newest[-1] == {"event_id": "last", "org": "acme"}
