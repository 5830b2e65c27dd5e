"""Config hot reload: which keys a running sidecar can take, what a new config changes, and
when the file changed.

`Sidecar.reload` (app.py) reads the file on SIGHUP and when `watch_file` sees it change, and
asks `check_reload` whether the new text may replace the running config; both run in a worker
thread, within the bounds of config_yaml.py (1 MiB, nodes, depth). A new revision of an etcd
source (config_etcd.py) takes the same path with the value as its text (`remote`), so there is
one way a config becomes live. Everything here is pure apart from reading the file: the swap
itself is the Sidecar's, in one synchronous step on the loop.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sidecar.config import Config, ConfigError, parse_config, read_config_text
from sidecar.routing.backend_tls import backend_tls_problems

__all__ = ["POLL_SECONDS", "RESTART", "RESTART_ONLY", "SETTLE_SECONDS", "check_reload", "describe_changes",
           "file_stamp", "read_config_text", "restart_only_changes", "watch_file"]

# Keys fixed for the life of the process: listeners are bound, stores, sinks and the tracer are
# built once, with these. A new value is a rejected reload that names the key; restart to apply.
RESTART_ONLY = (
    "listen", "admin_listen", "ops_listen", "health_listen", "max_message_bytes", "state_dir",
    "limits.store", "limits.redis_url", "limits.redis_tls", "limits.redis_timeout_ms", "limits.on_store_error",
    "limits.expected_replicas", "limits.breaker_failures", "limits.breaker_cooldown_ms",
    "overrides.store", "usage", "audit",
    "telemetry.otlp_endpoint", "telemetry.otlp_tls", "telemetry.otlp_headers", "telemetry.export_timeout_ms",
    "telemetry.service_name", "telemetry.resource_attributes", "telemetry.max_queued_spans",
    "telemetry.log_format", "config_source",
    # TLS on a listener is bound to its port: on/off and the paths need a restart; the files'
    # content rotates without one (tls_server.py)
    "tls.listen", "tls.admin_listen",
)
RESTART = "cannot change while running; restart the sidecar"
POLL_SECONDS = 1.0    # how often the file is looked at
SETTLE_SECONDS = 0.1  # a changed file must hold still this long: a writer may not be done
_MISSING = object()


def check_reload(running: Config, text: str, environ: Mapping[str, str] | None = None, *,
                 remote: bool = False) -> Config:
    """The config `text` describes, if it may replace `running`; else `ConfigError` with one
    `key.path: message` line per problem: invalid keys, and keys that need a restart. Safe to
    call in a worker thread (configs are immutable). `remote`: a value of an etcd source.
    The backends' TLS files are read and checked too (they apply on reload)."""
    config = parse_config(text, environ, remote=remote)
    problems = restart_only_changes(running, config) + backend_tls_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """One problem line per leaf key of `RESTART_ONLY` whose value differs."""
    problems = []
    for path in RESTART_ONLY:
        before, after = _lookup(old, path), _lookup(new, path)
        problems += [f"{key}: {RESTART}" for key in _differences(before, after, path)]
    return problems


def _lookup(node: Any, path: str) -> Any:
    for part in path.split("."):
        node = getattr(node, part, _MISSING)
    return node


def _differences(before: Any, after: Any, path: str) -> list[str]:
    """The key paths below `path` where `before` and `after` differ (sections and mappings are
    compared key by key, anything else as a whole)."""
    if before == after:
        return []
    if isinstance(before, BaseModel) and type(before) is type(after):
        return [key for name in type(before).model_fields
                for key in _differences(getattr(before, name), getattr(after, name), f"{path}.{name}")]
    if isinstance(before, dict) and isinstance(after, dict):
        return [key for name in sorted({*before, *after}, key=str)
                for key in _differences(before.get(name, _MISSING), after.get(name, _MISSING), f"{path}.{name}")]
    return [path]


def describe_changes(old: Config, new: Config) -> dict[str, list[str]]:
    """For the `config reloaded` log line: models and backends (`model/backend`) added, removed
    or changed, and the other top-level sections that changed. Empty lists are left out."""
    def backends(config: Config) -> dict[str, Any]:
        return {f"{m}/{b.name}": b for m, model in config.models.items() for b in model.backends}

    before, after = backends(old), backends(new)
    changes = {
        "models_added": sorted(set(new.models) - set(old.models)),
        "models_removed": sorted(set(old.models) - set(new.models)),
        "backends_added": sorted(set(after) - set(before)),
        "backends_removed": sorted(set(before) - set(after)),
        "backends_changed": sorted(k for k in set(before) & set(after) if before[k] != after[k]),
        "sections_changed": sorted(name for name in type(new).model_fields
                                   if name != "models" and getattr(old, name) != getattr(new, name)),
    }
    return {key: value for key, value in changes.items() if value}


def file_stamp(path: str | Path) -> tuple[int, int, int, int] | None:
    """What tells a changed file: modification time, size, inode and device. `stat` follows
    symlinks, so a Kubernetes ConfigMap update (its `..data` link swapped) shows as a new inode.
    None while the file is missing (e.g. between a writer's unlink and rename)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev


async def watch_file(path: str | Path, changed: Callable[[], object], interval: float = POLL_SECONDS) -> None:
    """Calls `changed` after `path` changed and held still for `SETTLE_SECONDS`; runs until
    cancelled. Polls (no inotify): it works alike on every filesystem and for symlink swaps."""
    seen = file_stamp(path)
    while True:
        await asyncio.sleep(interval)
        stamp = file_stamp(path)
        if stamp is None or stamp == seen:
            continue
        await asyncio.sleep(SETTLE_SECONDS)
        if file_stamp(path) != stamp:
            continue  # still being written: look again next round
        seen = stamp
        changed()
