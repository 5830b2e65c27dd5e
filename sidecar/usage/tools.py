"""Operator commands for usage records (CONTRACT §1): `sidecar spool status|replay` and
`sidecar dlq list|inspect|replay|resolve`. Each reads the spool directory and Kafka settings
from the sidecar's config file, prints for humans (or `--json`), and returns an exit code:
0 done, 1 not (everything), 2 bad arguments.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Producer

from sidecar.config import Config
from sidecar.usage.dlq import DeadLetters, Entry
from sidecar.usage.kafka_sink import HEADERS, PERMANENT, KafkaSink, oversize, producer_config
from sidecar.usage.record import started_seconds
from sidecar.usage.spool import open_spool, read_checkpoint, scan_segment, segment_paths, spool_owner


def _when(seconds: float) -> str:
    if not seconds:
        return "-"
    stamp = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return f"{stamp} ({time.time() - seconds:.0f} s ago)"


def _dead_letters(config: Config) -> DeadLetters:
    return DeadLetters(Path(config.usage.spool_dir) / "dlq")


# --- spool -------------------------------------------------------------------------------


def spool_status(config: Config, as_json: bool) -> int:
    directory = Path(config.usage.spool_dir)
    owner = spool_owner(directory)
    acked_below = read_checkpoint(directory)
    segments: list[dict[str, Any]] = []
    oldest = 0.0
    for path in segment_paths(directory):
        scan = scan_segment(path)
        unsettled = [p for i, p in enumerate(scan.payloads) if scan.first + i >= acked_below]
        if unsettled and not oldest:
            oldest = started_seconds(unsettled[0])
        segments.append({"segment": path.name, "bytes": scan.size, "records": len(scan.payloads),
                         "unsettled": len(unsettled), "torn_bytes": scan.torn_bytes, "problem": scan.problem})
    status: dict[str, Any] = {
        "dir": str(directory), "owner_pid": owner, "acked_below": acked_below,
        "segments": segments, "records": sum(s["records"] for s in segments),
        "unsettled": sum(s["unsettled"] for s in segments), "bytes": sum(s["bytes"] for s in segments),
        "oldest_unsettled_started_at": oldest or None, "dlq_open": _dead_letters(config).count()}
    if as_json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"spool {directory}: " + (f"in use by pid {owner} (a running sidecar)" if owner else "not in use"))
    print(f"  segments: {len(segments)}, bytes: {status['bytes']}, records: {status['records']}, "
          f"not yet acknowledged: {status['unsettled']}")
    print(f"  oldest unacknowledged record started: {_when(oldest)}")
    for segment in segments:
        if segment["problem"]:
            print(f"  {segment['segment']}: {segment['problem']}: {segment['torn_bytes']} bytes after the last whole "
                  "record" + (" (being written)" if owner else "; truncated at the next start"))
    print(f"  dead letters open: {status['dlq_open']} (see `sidecar dlq list`)")
    return 0


def spool_replay(config: Config, timeout: float) -> int:
    """Sends what a stopped sidecar left in its spool to Kafka, then exits."""
    if config.usage.sink != "kafka":
        print("usage.sink is not kafka in this config: there is no spool to replay")
        return 2
    directory = Path(config.usage.spool_dir)
    owner = spool_owner(directory)
    if owner:
        print(f"the spool {directory} is in use by pid {owner}: a running sidecar replays it by itself")
        return 1
    return asyncio.run(_replay(config, directory, timeout))


async def _replay(config: Config, directory: Path, timeout: float) -> int:
    usage = config.usage
    spool = await asyncio.to_thread(open_spool, directory, durability="interval",
                                    fsync_interval=usage.fsync_interval_ms / 1000.0,
                                    max_bytes=usage.max_spool_bytes, on_full=usage.on_spool_full,
                                    segment_bytes=usage.segment_bytes)
    total = spool.unsettled()
    print(f"replaying {total} records from {directory} to {usage.kafka.topic} at {usage.kafka.bootstrap_servers}")
    sink = KafkaSink(usage, spool, DeadLetters(directory / "dlq"))
    await sink.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(spool.wait_settled(), timeout)
    left = spool.unsettled()
    await sink.aclose()
    if left:
        print(f"{total - left} of {total} acknowledged; {left} still in the spool (Kafka: "
              f"{'up' if sink.kafka_up else 'unreachable'}); run it again or start the sidecar")
        return 1
    print(f"all {total} acknowledged by Kafka")
    return 0


# --- dead letters ------------------------------------------------------------------------


def dlq_list(config: Config, include_closed: bool, as_json: bool) -> int:
    entries = _dead_letters(config).entries(include_closed)
    if as_json:
        print(json.dumps([{k: v for k, v in e.to_json().items() if k != "record"} for e in entries], indent=1))
        return 0
    counts: dict[str, int] = {}
    for entry in entries:
        if entry.state == "open":
            counts[entry.reason] = counts.get(entry.reason, 0) + 1
    print(f"{sum(counts.values())} open dead letters" + "".join(f"; {r}: {n}" for r, n in sorted(counts.items())))
    if entries:
        print(f"{'EVENT_ID':38} {'ORG':16} {'REASON':28} {'STATE':9} DEAD-LETTERED AT")
    for entry in entries:
        print(f"{entry.event_id:38} {entry.org:16} {entry.reason:28} {entry.state:9} {entry.dead_lettered_at}")
    return 0


def dlq_inspect(config: Config, event_id: str) -> int:
    entry = _dead_letters(config).get(event_id)
    if entry is None:
        print(f"no dead letter with event id {event_id}")
        return 1
    shown: dict[str, Any] = {**entry.to_json(), "record": entry.decoded(), "record_bytes": len(entry.record)}
    print(json.dumps(shown, indent=1))
    return 0


def dlq_resolve(config: Config, event_ids: list[str], note: str) -> int:
    dead = _dead_letters(config)
    code = 0
    for event_id in event_ids:
        entry = dead.get(event_id)
        if entry is None or entry.state != "open":
            print(f"{event_id}: no open dead letter with this event id")
            code = 1
            continue
        dead.close(entry, "resolved", note)
        print(f"{event_id}: resolved")
    return code


def dlq_replay(config: Config, event_ids: list[str], replay_all: bool, timeout: float) -> int:
    """Sends dead letters to Kafka again (after their cause was fixed); each one that Kafka
    acknowledges is closed as `replayed`, the others stay open with the new error."""
    dead = _dead_letters(config)
    if replay_all:
        entries = dead.entries()
    else:
        found = [(i, dead.get(i)) for i in event_ids]
        missing = [i for i, e in found if e is None or e.state != "open"]
        if missing:
            print(f"no open dead letter with event id {', '.join(missing)}")
            return 1
        entries = [e for _, e in found if e is not None]
    if not entries:
        print("no open dead letters")
        return 0
    kafka = config.usage.kafka
    results: dict[str, str] = {}
    sendable: list[Entry] = []
    for entry in entries:
        too_large = oversize(kafka, entry.org.encode(), entry.record)
        if too_large:
            results[entry.event_id] = f"MSG_SIZE_TOO_LARGE: {too_large}"
        else:
            sendable.append(entry)
    if sendable:
        results.update(_send(config, sendable, timeout))
    code = 0
    for entry in entries:
        error = results.get(entry.event_id, "")
        if error:
            code = 1
            entry.replay_errors.append(f"{datetime.now(UTC).isoformat(timespec='seconds')}: {error}")
            dead.update(entry)
            print(f"{entry.event_id}: not replayed: {error}")
        else:
            dead.close(entry, "replayed", f"sent to {kafka.topic}")
            print(f"{entry.event_id}: replayed to {kafka.topic}")
    return code


def _send(config: Config, entries: list[Entry], timeout: float) -> dict[str, str]:
    """event id -> error ("" when Kafka acknowledged it)."""
    kafka = config.usage.kafka
    settings = {k: v for k, v in producer_config(kafka).items() if k != "statistics.interval.ms"}
    producer = Producer({**settings, "message.timeout.ms": int(timeout * 1000)})
    results: dict[str, str] = {}

    def delivered(event_id: str, error: KafkaError | None, _message: Any) -> None:
        if error is None:
            results[event_id] = ""
        else:
            results[event_id] = f"{PERMANENT.get(error.code(), error.name())}: {error.str()}"

    for entry in entries:
        producer.produce(kafka.topic, value=entry.record, key=entry.org.encode(), headers=HEADERS,
                         on_delivery=partial(delivered, entry.event_id))
    producer.flush(timeout + 1)
    for entry in entries:
        results.setdefault(entry.event_id, "no answer from Kafka in time")
    return results
