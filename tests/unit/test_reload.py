"""Config reload decisions: what a running sidecar may take, what a new config changes, and
noticing a changed file (a rewrite, a rename over it, a Kubernetes-style symlink swap)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.reload import check_reload, describe_changes, file_stamp, restart_only_changes, watch_file

BASE = """
listen: 127.0.0.1:50051
usage: {sink: kafka, kafka: {topic: inference.usage}}
telemetry: {sample_ratio: 1.0}
limits: {store: memory, orgs: {anonymous: {requests_per_minute: 60}}}
models:
  chat:
    backends:
      - {name: a, address: "127.0.0.1:7001", weight: 1}
      - {name: b, address: "127.0.0.1:7002", weight: 1}
"""
RUNNING = parse_config(BASE, environ={})


def changed(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


@pytest.mark.parametrize(("old", "new"), [
    ("weight: 1}\n      - {name: b", "weight: 0}\n      - {name: b"),                 # routing
    ("requests_per_minute: 60", "requests_per_minute: 120"),                        # limits
    ("sample_ratio: 1.0", "sample_ratio: 0.1"),                                     # read on every call
    ("      - {name: b, address: \"127.0.0.1:7002\", weight: 1}\n", ""),            # a backend leaves
], ids=["weight", "limit", "sample_ratio", "backend_removed"])
def test_what_a_running_sidecar_takes(old: str, new: str) -> None:
    config = check_reload(RUNNING, changed(old, new), environ={})
    assert config != RUNNING


@pytest.mark.parametrize(("old", "new", "problems"), [
    ("listen: 127.0.0.1:50051", "listen: 127.0.0.1:50061", ["listen"]),
    ("listen: 127.0.0.1:50051", "listen: 127.0.0.1:50051\nhealth_listen: 0.0.0.0:50053", ["health_listen"]),
    ("topic: inference.usage", "topic: other", ["usage.kafka.topic"]),
    ("sink: kafka, kafka", "sink: file, kafka", ["usage.sink"]),
    ("store: memory, orgs", "store: redis, redis_url: redis://127.0.0.1:6379/0, orgs",
     ["limits.store", "limits.redis_url"]),
    ("telemetry: {sample_ratio: 1.0}", "telemetry: {otlp_endpoint: http://127.0.0.1:4317}",
     ["telemetry.otlp_endpoint"]),
    ("telemetry: {sample_ratio: 1.0}", "telemetry: {otlp_headers: {x-key: k}}", ["telemetry.otlp_headers.x-key"]),
], ids=["listen", "health_listen", "kafka_topic", "usage_sink", "limit_store", "otlp_endpoint", "otlp_header"])
def test_keys_that_need_a_restart_are_refused_by_key_path(old: str, new: str, problems: list[str]) -> None:
    text = changed(old, new)
    assert [p.split(": ", 1)[0] for p in restart_only_changes(RUNNING, parse_config(text, environ={}))] == problems
    with pytest.raises(ConfigError) as refused:
        check_reload(RUNNING, text, environ={})
    assert refused.value.problems == [f"{p}: cannot change while running; restart the sidecar" for p in problems]


def test_an_invalid_config_is_refused_like_check_config() -> None:
    with pytest.raises(ConfigError) as refused:
        check_reload(RUNNING, changed("weight: 1}\n      - {name: b", "weight: -1}\n      - {name: b"),
                     environ={})
    assert refused.value.problems == ["models.chat.backends[0].weight: must be >= 0"]


@pytest.mark.parametrize(("old", "new", "problems"), [
    ("telemetry: {sample_ratio: 1.0}", "telemetry: {sample_ratio: 1.0}\ntelemetry: {sample_ratio: 0.1}",
     ["telemetry: duplicate key (first on line 4); remove one"]),
    ("weight: 1}\n      - {name: b", "weight: true}\n      - {name: b",
     ["models.chat.backends[0].weight: must be a number, not true or false"]),
    ("requests_per_minute: 60", "requests_per_minute: 1e400",
     ["limits.orgs.anonymous.requests_per_minute: must be a finite number"]),
], ids=["duplicate_key", "bool_weight", "infinite_rate"])
def test_nonsense_is_refused_on_reload_too(old: str, new: str, problems: list[str]) -> None:
    """Issue 15 finding 4: on reload the last duplicate silently won, true was 1, 1e400 was inf."""
    with pytest.raises(ConfigError) as refused:
        check_reload(RUNNING, changed(old, new), environ={})
    assert refused.value.problems == problems


def test_describe_changes_names_models_backends_and_sections() -> None:
    new = parse_config(changed('      - {name: b, address: "127.0.0.1:7002", weight: 1}\n',
                               '      - {name: c, address: "127.0.0.1:7003"}\n  embed:\n'
                               '    backends: [{name: e, address: "127.0.0.1:7005"}]\n')
                       .replace("weight: 1}", "weight: 2}").replace("sample_ratio: 1.0", "sample_ratio: 0.5"),
                       environ={})
    assert describe_changes(RUNNING, new) == {
        "models_added": ["embed"], "backends_added": ["chat/c", "embed/e"], "backends_removed": ["chat/b"],
        "backends_changed": ["chat/a"], "sections_changed": ["telemetry"]}
    assert describe_changes(RUNNING, RUNNING) == {}


def test_file_stamp_sees_rewrites_renames_and_symlink_swaps(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a")
    first = file_stamp(path)
    path.write_text("bb")                                # size (and mtime)
    second = file_stamp(path)
    assert first is not None and second is not None and second != first
    other = tmp_path / "new.yaml"
    other.write_text("bb")
    os.utime(other, ns=(second[0], second[0]))           # same size and mtime, another inode
    os.replace(other, path)
    assert file_stamp(path) not in (None, second)
    # Kubernetes: config.yaml -> ..data/config.yaml, ..data -> a timestamped directory, swapped
    for name in ("v1", "v2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("same")
    (tmp_path / "..data").symlink_to("v1")
    link = tmp_path / "linked.yaml"
    link.symlink_to("..data/config.yaml")
    before = file_stamp(link)
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert file_stamp(link) != before
    assert file_stamp(tmp_path / "missing.yaml") is None


async def test_watch_file_reports_a_change_once_it_holds_still(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("one")
    seen: list[str] = []
    watcher = asyncio.get_running_loop().create_task(
        watch_file(path, lambda: seen.append(path.read_text()), interval=0.02))
    try:
        await asyncio.sleep(0.1)
        assert seen == []                                # nothing changed
        path.write_text("two")
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert seen == ["two"]                           # once
        path.unlink()                                    # missing: nothing to report
        await asyncio.sleep(0.1)
        assert seen == ["two"]
    finally:
        watcher.cancel()
