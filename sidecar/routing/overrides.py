"""Operator overrides of routing: a backend's weight, a drain, or a pin; persisted, expiring.

Set through `RoutingAdmin` on the admin listener. One override per (model, backend), at most one
pin per model (a new pin replaces the old). Times are wall-clock epoch seconds, so overrides
survive a restart: the table is written to `state_dir/overrides.json` (temp file, fsync,
rename) on every change and read at start, dropping what expired meanwhile.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("sidecar.routing")
Action = Literal["weight", "drain", "pin"]
FILE_NAME = "overrides.json"


@dataclass(frozen=True, slots=True)
class Override:
    model: str
    backend: str
    action: Action
    weight: float = 0.0        # for action "weight"
    ttl_seconds: int = 0       # 0 = until cleared
    reason: str = ""
    created_by: str = ""       # admin token id
    created_at: float = 0.0
    expires_at: float = 0.0    # 0 = never

    def live(self, now: float) -> bool:
        return self.expires_at == 0.0 or now < self.expires_at


class OverrideTable:
    """The overrides in force, by (model, backend); `path` None keeps them in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._items: dict[tuple[str, str], Override] = {}

    def load(self, now: float) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_text())
            items = [Override(**item) for item in raw["overrides"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot read routing overrides; starting without them",
                      extra={"path": str(self.path), "error": str(exc)})
            return
        self._items = {(o.model, o.backend): o for o in items if o.live(now)}

    def live(self, now: float) -> list[Override]:
        return [o for o in self._items.values() if o.live(now)]

    def put(self, override: Override) -> None:
        if override.action == "pin":
            for key in [k for k, o in self._items.items() if o.model == override.model and o.action == "pin"]:
                del self._items[key]
        self._items[(override.model, override.backend)] = override
        self._save()

    def clear(self, model: str, backend: str) -> bool:
        if self._items.pop((model, backend), None) is None:
            return False
        self._save()
        return True

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w") as out:
            json.dump({"overrides": [asdict(o) for o in self._items.values()]}, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(self.path)

    def __repr__(self) -> str:
        return f"<OverrideTable {len(self._items)} at {self.path}>"
