"""The pure parts of the etcd config source: the bootstrap file, the rules for a config kept in
etcd, the local cache, and the line `sidecar config push` puts on top. (Against a real etcd:
tests/integration/test_config_etcd.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import ConfigError, load_bootstrap, load_config, parse_bootstrap, parse_config
from sidecar.config_cache import CachedConfig, read_cache, write_cache
from sidecar.config_cli import header, pushed_by, strip_header
from sidecar.reload import RESTART, check_reload

MODELS = "models:\n  chat:\n    backends: [{name: a, address: 127.0.0.1:6001}]\n"
BOOTSTRAP = """config_source:
  kind: etcd
  endpoints: ["etcd-0.etcd:2379", "10.0.0.2:2379"]
  key: /fleet/chat/config
  username: sidecar
  password: ${ETCD_PASSWORD}
"""


def test_a_bootstrap_holds_where_the_config_is_and_nothing_else() -> None:
    bootstrap = parse_bootstrap(BOOTSTRAP, environ={"ETCD_PASSWORD": "s3cret"})
    assert bootstrap.config is None
    source = bootstrap.source
    assert (source.kind, source.key, source.endpoints) == ("etcd", "/fleet/chat/config",
                                                          ["etcd-0.etcd:2379", "10.0.0.2:2379"])
    assert (source.username, source.password, source.timeout_ms) == ("sidecar", "s3cret", 2000)
    assert source.cache_file == "./var/config-cache.json" and source.tls is None
    assert "s3cret" not in repr(source)  # the password never shows in a log line or a traceback


def test_a_file_config_is_its_own_bootstrap() -> None:
    text = "config_source: {kind: file}\n" + MODELS
    bootstrap = parse_bootstrap(text, environ={})
    assert bootstrap.config is not None and bootstrap.source.kind == "file" and bootstrap.text == text
    assert parse_bootstrap(MODELS, environ={}).source.kind == "file"  # the default


def test_an_unset_password_variable_names_the_key() -> None:
    with pytest.raises(ConfigError) as failure:
        parse_bootstrap(BOOTSTRAP, environ={})
    assert failure.value.problems == ["config_source.password: environment variable ETCD_PASSWORD is not set"]


def test_load_config_of_a_bootstrap_says_where_the_config_is(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(f"config_source: {{kind: etcd, endpoints: ['127.0.0.1:2379'], cache_file: {tmp_path}/c.json}}\n")
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    assert failure.value.problems == [(f"config_source.kind: {path} is a bootstrap: the config is kept in etcd key "
                                      f"/sidecar/config (`sidecar config get --config {path}` shows it)")]
    assert load_bootstrap(path).source.cache_file == f"{tmp_path}/c.json"


def test_check_config_accepts_a_bootstrap(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(f"config_source: {{kind: etcd, endpoints: ['127.0.0.1:2379'], cache_file: {tmp_path}/c.json}}\n")
    result = subprocess.run([sys.executable, "-m", "sidecar", "check-config", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{path}: ok (a bootstrap: the config is kept in etcd key /sidecar/config)"


def test_a_config_kept_in_etcd_may_not_say_where_configs_come_from() -> None:
    for section in ("config_source: {kind: file}\n", "config_source: {kind: etcd, endpoints: ['e:1']}\n"):
        with pytest.raises(ConfigError) as failure:
            parse_config(section + MODELS, environ={}, remote=True)
        assert failure.value.problems == [("config_source: not in a config kept in etcd: it belongs in each "
                                          "sidecar's bootstrap file (`sidecar run --config`)")]
    assert parse_config(MODELS, environ={}, remote=True).models["chat"].backends[0].name == "a"


def test_a_file_reload_cannot_turn_the_file_into_a_bootstrap() -> None:
    running = parse_config(MODELS, environ={})
    with pytest.raises(ConfigError) as failure:
        check_reload(running, "config_source: {kind: etcd, endpoints: ['e:1']}\n", environ={})
    assert failure.value.problems == [("config_source.kind: etcd makes this file a bootstrap, read once at start "
                                      "by `sidecar run`; it holds no config")]


def test_restart_only_keys_are_checked_for_etcd_values_too() -> None:
    running = parse_config(MODELS, environ={}, remote=True)
    with pytest.raises(ConfigError) as failure:
        check_reload(running, "max_message_bytes: 1024\n" + MODELS, environ={}, remote=True)
    assert failure.value.problems == [f"max_message_bytes: {RESTART}"]


# --- the cache ------------------------------------------------------------------------------


def test_the_cache_round_trips_and_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "cache.json"
    write_cache(path, CachedConfig("/sidecar/config", 42, "listen: ${SC_LISTEN}\n" + MODELS))
    cached = read_cache(path)
    assert cached is not None
    assert (cached.key, cached.revision, cached.text) == ("/sidecar/config", 42, "listen: ${SC_LISTEN}\n" + MODELS)
    assert cached.saved_at.endswith("Z") and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["cache.json"]  # no temporary file left
    write_cache(path, CachedConfig("/sidecar/config", 43, MODELS))
    assert read_cache(path) == CachedConfig("/sidecar/config", 43, MODELS, read_cache(path).saved_at)  # type: ignore[union-attr]


def test_no_cache_is_none_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    assert read_cache(path) is None
    write_cache(path, CachedConfig("/k", 7, MODELS))
    body = json.loads(path.read_text())
    body["text"] = body["text"].replace("6001", "6002")  # edited by hand
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError) as failure:
        read_cache(path)
    assert failure.value.problems == [(f"config_source.cache_file: {path} cannot be used: its text does not match "
                                      "its sha256 (damaged or edited)")]
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be used"):
        read_cache(path)


# --- what push writes on top --------------------------------------------------------------------


def test_the_push_line_is_a_comment_that_is_replaced_not_stacked() -> None:
    line = header("new config.yaml")
    assert line.startswith("# sidecar config push: ") and line.endswith(" new config.yaml\n")
    stored = line + MODELS
    assert parse_config(stored, environ={}) == parse_config(MODELS, environ={})  # YAML ignores it
    assert strip_header(stored) == MODELS and strip_header(MODELS) == MODELS
    assert pushed_by(stored) == line.removeprefix("# sidecar config push: ").strip()
    assert pushed_by(MODELS) == ""
