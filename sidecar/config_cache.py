"""The last config an etcd source applied, kept in a local file (`config_source.cache_file`), so
that a sidecar starts, and so keeps serving across a restart, while etcd is down.

Written after every revision that became live, atomically: a temporary file beside the cache is
written and fsynced, renamed over it, and the directory fsynced, so a crash leaves the old cache
or the new one, never half of one. JSON: the etcd key, the revision the text came from (its
`mod_revision`), when it was saved, the text's SHA-256 (a cache edited by hand or damaged is
refused, not half-used) and the text as etcd holds it: `${ENV}` references are substituted at
each start, with that process's environment, as for a value read from etcd.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sidecar.config import ConfigError

FORMAT = "sidecar.config-cache.v1"
MAX_CACHE_BYTES = 8 * 1024 * 1024  # a 1 MiB config, escaped into JSON, with room to spare


@dataclass(frozen=True)
class CachedConfig:
    key: str
    revision: int
    text: str
    saved_at: str = ""  # RFC 3339, UTC

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def write_cache(path: str | Path, cached: CachedConfig) -> None:
    """Replaces the cache at `path` with `cached` (blocking: call it in a worker thread).
    Creates the directory; the file is readable by its owner only (a config may hold secrets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = cached.saved_at or datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    body = {"format": FORMAT, **asdict(cached), "saved_at": saved, "sha256": cached.sha256}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(body, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_cache(path: str | Path) -> CachedConfig | None:
    """The cache at `path`; None when there is none; `ConfigError` naming the file when it
    cannot be used (unreadable, not ours, damaged)."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CACHE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError([f"config_source.cache_file: cannot read {path}: {exc.strerror or exc}"]) from None
    try:
        if len(data) > MAX_CACHE_BYTES:
            raise ValueError(f"larger than {MAX_CACHE_BYTES} bytes")
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError(f"not a config cache ({FORMAT})")
        cached = CachedConfig(key=str(body["key"]), revision=int(body["revision"]), text=str(body["text"]),
                              saved_at=str(body.get("saved_at", "")))
        if body.get("sha256") != cached.sha256:
            raise ValueError("its text does not match its sha256 (damaged or edited)")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError([f"config_source.cache_file: {path} cannot be used: {exc}"]) from None
    return cached
