"""The dead-letter store: usage records Kafka rejected for good (too large for the topic, not
authorized, invalid), kept until an operator replays or resolves them.

One JSON file per record in `<spool_dir>/dlq/`, named by its event id, written atomically and
fsynced before the record leaves the spool, so a record is always in one of the two (a crash in
between leaves it in both; the same event id overwrites the same entry). Replayed and resolved
entries move to `dlq/done/` with what happened to them: the DLQ is also their audit trail.

    {"event_id", "org", "reason", "detail", "dead_lettered_at", "record" (base64 protobuf),
     "state": "open" | "replayed" | "resolved", "note", "closed_at", "replay_errors": [...]}
"""
from __future__ import annotations

import base64
import json
import os
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from sidecar_client.sidecar.usage.v1 import usage_pb2

from sidecar.usage.spool import fsync_dir


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Entry:
    event_id: str
    org: str
    reason: str
    detail: str
    dead_lettered_at: str
    record: bytes
    state: str = "open"
    note: str = ""
    closed_at: str = ""
    replay_errors: list[str] = field(default_factory=list)

    def decoded(self) -> dict[str, Any]:
        """The record as JSON (proto field names), or why it cannot be decoded."""
        try:
            return json_format.MessageToDict(usage_pb2.UsageRecord.FromString(self.record),
                                             preserving_proto_field_name=True)
        except Exception as exc:  # noqa: BLE001 - a record that does not decode is still shown
            return {"error": f"cannot decode: {exc}"}

    def to_json(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "org": self.org, "reason": self.reason, "detail": self.detail,
                "dead_lettered_at": self.dead_lettered_at, "record": base64.b64encode(self.record).decode(),
                "state": self.state, "note": self.note, "closed_at": self.closed_at,
                "replay_errors": self.replay_errors}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(event_id=data["event_id"], org=data.get("org", ""), reason=data["reason"],
                   detail=data.get("detail", ""), dead_lettered_at=data.get("dead_lettered_at", ""),
                   record=base64.b64decode(data["record"]), state=data.get("state", "open"),
                   note=data.get("note", ""), closed_at=data.get("closed_at", ""),
                   replay_errors=list(data.get("replay_errors", [])))


class DeadLetters:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.done_directory = directory / "done"

    def add(self, payload: bytes, reason: str, detail: str) -> Entry:
        """Stores a rejected record (blocking: run it in a thread). Returns its entry."""
        try:
            record = usage_pb2.UsageRecord.FromString(payload)
            event_id, org = record.event_id, record.org
        except Exception:  # noqa: BLE001 - kept even when it does not parse
            event_id, org = "", ""
        entry = Entry(event_id=event_id or f"unparsed-{zlib.crc32(payload):08x}", org=org, reason=reason,
                      detail=detail, dead_lettered_at=_now(), record=payload)
        self._write(self.directory, entry)
        return entry

    def count(self) -> int:
        """Open entries."""
        try:
            return sum(1 for _ in self.directory.glob("*.json"))
        except OSError:
            return 0

    def entries(self, include_closed: bool = False) -> list[Entry]:
        paths = sorted(self.directory.glob("*.json"))
        if include_closed:
            paths += sorted(self.done_directory.glob("*.json"))
        return [Entry.from_json(json.loads(p.read_text())) for p in paths]

    def get(self, event_id: str) -> Entry | None:
        for directory in (self.directory, self.done_directory):
            path = directory / f"{_safe(event_id)}.json"
            if path.exists():
                return Entry.from_json(json.loads(path.read_text()))
        return None

    def close(self, entry: Entry, state: str, note: str = "") -> None:
        """Moves an open entry to done/ as `replayed` or `resolved` (with the operator's note)."""
        entry.state, entry.note, entry.closed_at = state, note, _now()
        self._write(self.done_directory, entry)
        (self.directory / f"{_safe(entry.event_id)}.json").unlink(missing_ok=True)

    def update(self, entry: Entry) -> None:
        """Rewrites an open entry (e.g. with the error of a failed replay)."""
        self._write(self.directory, entry)

    def _write(self, directory: Path, entry: Entry) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_safe(entry.event_id)}.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            json.dump(entry.to_json(), out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
        fsync_dir(directory)


def _safe(event_id: str) -> str:
    """An event id as a file name (ids are UUIDs; anything else is made harmless)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in event_id)[:128]
