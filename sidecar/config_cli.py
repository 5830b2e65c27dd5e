"""`sidecar config …`: the config an etcd source holds, from a shell.

    sidecar config push FILE --config BOOTSTRAP [--allow-restart]
    sidecar config rollback REVISION --config BOOTSTRAP [--allow-restart]
    sidecar config get --config BOOTSTRAP [--revision N] [--json]
    sidecar config history --config BOOTSTRAP [--limit N] [--json]

Where etcd is (endpoints, key, TLS, credentials) comes from the same bootstrap file the
sidecars run with (`config_source`), so the CLI reaches what they watch and nothing else.

`push` validates FILE with the sidecar's own parser (exit 2, one `key.path: message` line per
problem, nothing written), refuses a change of keys that need a restart unless
`--allow-restart` (every running sidecar would refuse it until restarted), writes nothing when
etcd already holds the same config, and otherwise writes it with one comment line on top
(`# sidecar config push: TIME USER@HOST FILE`: etcd keeps no time or author of a revision, so
the value carries them; YAML ignores it). It prints the new revision and the config version the
sidecars' `/readyz` will show. `rollback` pushes the value an earlier revision held (see
`history`), through the same checks. etcd unreachable: exit 1.
"""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HEADER = "# sidecar config push: "
DEFAULT_HISTORY = 10


def add_parser(sub: Any) -> None:
    config = sub.add_parser("config", help="the config kept in etcd: push, get, history (--config BOOTSTRAP)")
    actions = config.add_subparsers(metavar="ACTION", required=True)
    push = actions.add_parser("push", help="validate FILE and publish it to the etcd key; exit 2 if invalid")
    push.add_argument("file", metavar="FILE")
    push.add_argument("--config", required=True, metavar="BOOTSTRAP", help="a bootstrap with config_source etcd")
    push.add_argument("--allow-restart", action="store_true",
                      help="publish a change of restart-only keys (running sidecars refuse it until restarted)")
    push.set_defaults(handler=lambda a: _run(a, push_config))
    rollback = actions.add_parser("rollback", help="push again the config an earlier revision held")
    rollback.add_argument("revision", type=int, metavar="REVISION", help="a revision `history` lists")
    rollback.add_argument("--config", required=True, metavar="BOOTSTRAP")
    rollback.add_argument("--allow-restart", action="store_true", help="as for push")
    rollback.set_defaults(handler=lambda a: _run(a, rollback_config))
    get = actions.add_parser("get", help="print the config the etcd key holds (its revision on stderr)")
    get.add_argument("--config", required=True, metavar="BOOTSTRAP")
    get.add_argument("--revision", type=int, default=0, help="as it was at this etcd revision (default: now)")
    get.add_argument("--json", action="store_true", help="the value and its revisions as one JSON object")
    get.set_defaults(handler=lambda a: _run(a, get_config))
    history = actions.add_parser("history", help="the key's earlier revisions, newest first")
    history.add_argument("--config", required=True, metavar="BOOTSTRAP")
    history.add_argument("--limit", type=int, default=DEFAULT_HISTORY, help=f"at most this many (default "
                                                                           f"{DEFAULT_HISTORY})")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    history.set_defaults(handler=lambda a: _run(a, config_history))


def _run(args: argparse.Namespace, action: Callable[[Any, argparse.Namespace], Awaitable[int]]) -> int:
    """Loads the bootstrap, runs `action` with an `EtcdKV` on it; maps failures to exit codes."""
    from sidecar.config import ConfigError, load_bootstrap
    from sidecar.etcd_kv import EtcdKV, EtcdUnavailable

    try:
        bootstrap = load_bootstrap(args.config)
    except ConfigError as exc:
        return _problems(exc.problems)
    if bootstrap.source.kind != "etcd":
        return _problems([f"config_source.kind: {args.config} reads its config from the file itself, not etcd"])
    args.config_key = bootstrap.source.key

    async def main() -> int:
        kv = EtcdKV(bootstrap.source)
        try:
            return await action(kv, args)
        finally:
            await kv.aclose()

    try:
        return asyncio.run(main())
    except ConfigError as exc:
        return _problems(exc.problems)
    except EtcdUnavailable as exc:
        print(f"sidecar config: etcd: {exc}", file=sys.stderr)
        return 1


def _problems(problems: list[str]) -> int:
    for problem in problems:
        print(problem, file=sys.stderr)
    return 2


# --- push -------------------------------------------------------------------------------------


async def push_config(kv: Any, args: argparse.Namespace) -> int:
    from sidecar.config import read_config_text

    return await publish(kv, args, read_config_text(args.file), Path(args.file).name)


async def value_at(kv: Any, args: argparse.Namespace, written: bool = False) -> Any:
    """The key's value at `args.revision` (0: now); `written`: the value that revision wrote.
    None, said on stderr, when there is none or etcd compacted it."""
    from sidecar.etcd_kv import RevisionCompacted

    try:
        value, _ = await kv.get(args.config_key, revision=args.revision)
    except RevisionCompacted:
        print(f"sidecar config: revision {args.revision} was compacted by etcd", file=sys.stderr)
        return None
    if written and (value is None or value.mod_revision != args.revision):
        print(f"sidecar config: revision {args.revision} did not write etcd key {args.config_key} (see `sidecar "
              "config history`)", file=sys.stderr)
        return None
    if value is None:
        print(f"sidecar config: etcd key {args.config_key} holds no config"
              + (f" at revision {args.revision}" if args.revision else ""), file=sys.stderr)
    return value


async def rollback_config(kv: Any, args: argparse.Namespace) -> int:
    from sidecar.config import config_text

    value = await value_at(kv, args, written=True)
    if value is None:
        return 1
    return await publish(kv, args, config_text(value.value, f"revision {args.revision}"),
                         f"rollback-to-revision-{args.revision}")


async def publish(kv: Any, args: argparse.Namespace, text: str, origin: str) -> int:
    """Validates `text`, checks it against what etcd holds, and writes it (see above)."""
    from sidecar.app import config_version
    from sidecar.config import ConfigError, parse_config
    from sidecar.reload import restart_only_changes

    key = args.config_key
    text = strip_header(text)
    config = parse_config(text, remote=True)  # ConfigError: exit 2, nothing written
    current, _ = await kv.get(key)
    if current is not None:
        running = strip_header(current.value.decode("utf-8", errors="replace"))
        if running == text:
            print(f"unchanged: {key} revision {current.mod_revision} holds this config already")
            return 0
        try:
            before = parse_config(running, remote=True)
        except ConfigError:
            before = None  # what etcd holds is invalid (written around the CLI): nothing to compare
        restart = restart_only_changes(before, config) if before is not None else []
        if restart and not args.allow_restart:
            advice = "(root): running sidecars refuse these; to publish anyway: --allow-restart, then restart them"
            return _problems([*restart, advice])
    stored = header(origin) + text
    revision = await kv.put(key, stored.encode())
    print(f"pushed {key}: revision {revision}, config version {config_version(stored)}, "
          f"{len(stored.encode())} bytes")
    return 0


def header(file_name: str) -> str:
    """The line `push` puts on top of what it writes: when, who, from which file."""
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = str(os.getuid())
    return f"{HEADER}{now} {user}@{socket.gethostname()} {' '.join(file_name.split())}\n"


def strip_header(text: str) -> str:
    """The config without the line an earlier `push` put on top (`get > f; edit f; push f`)."""
    return text.split("\n", 1)[1] if text.startswith(HEADER) and "\n" in text else text


def pushed_by(text: str) -> str:
    """What the push line says (time, user@host, file), or "" for a value written otherwise."""
    return text.split("\n", 1)[0].removeprefix(HEADER).strip() if text.startswith(HEADER) else ""


# --- get, history -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Revision:
    """One value of the key, as `get --json` and `history` show it."""

    revision: int          # the etcd revision that wrote it (mod_revision)
    config_version: str    # what /readyz shows while it runs (sha256 of the text, 12 digits)
    bytes: int
    pushed: str            # `time user@host file` of `sidecar config push`, or ""
    valid: bool            # validates here (with this shell's environment)

    @classmethod
    def of(cls, value: Any) -> Revision:
        from sidecar.app import config_version
        from sidecar.config import ConfigError, parse_config

        text = value.value.decode("utf-8", errors="replace")
        try:
            parse_config(text, remote=True)
            valid = True
        except ConfigError:
            valid = False
        return cls(value.mod_revision, config_version(text), len(value.value), pushed_by(text), valid)


async def get_config(kv: Any, args: argparse.Namespace) -> int:
    value = await value_at(kv, args)
    if value is None:
        return 1
    info = Revision.of(value)
    if args.json:
        body = {"key": args.config_key, **info.__dict__, "create_revision": value.create_revision,
                "text": value.value.decode("utf-8", errors="replace")}
        print(json.dumps(body))
        return 0
    sys.stdout.write(value.value.decode("utf-8", errors="replace"))
    sys.stdout.flush()
    print(f"# {args.config_key}: revision {info.revision}, config version {info.config_version}, "
          f"{info.bytes} bytes" + (f", pushed {info.pushed}" if info.pushed else ""), file=sys.stderr)
    return 0


async def config_history(kv: Any, args: argparse.Namespace) -> int:
    """Newest first, by reading the key as it was just before each value was written (etcd
    keeps every revision until it compacts them)."""
    from sidecar.etcd_kv import RevisionCompacted

    entries: list[Revision] = []
    value, _ = await kv.get(args.config_key)
    end = "" if value is not None else f"etcd key {args.config_key} holds no config"
    while value is not None and len(entries) < args.limit:
        entries.append(Revision.of(value))
        if value.version == 1:  # the first write since the key was created
            end = f"the key was created at revision {value.mod_revision}"
            break
        try:
            value, _ = await kv.get(args.config_key, revision=value.mod_revision - 1)
        except RevisionCompacted:
            end = f"revisions before {value.mod_revision} were compacted by etcd"
            break
    if args.json:
        for entry in entries:
            print(json.dumps(entry.__dict__))
        return 0
    print(f"{'REVISION':<10}{'CONFIG VERSION':<16}{'BYTES':>8}  VALID    PUSHED")
    for entry in entries:
        print(f"{entry.revision:<10}{entry.config_version:<16}{entry.bytes:>8}  "
              f"{'yes' if entry.valid else 'NO':<7}  {entry.pushed or '-'}")
    if end:
        print(f"({end})")
    return 0
