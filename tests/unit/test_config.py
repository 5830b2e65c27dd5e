"""Config validation: one small YAML per invalid case, each with the exact key-path message."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from sidecar.config import Config, ConfigError, key_path, load_config, parse_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
INVALID = sorted((CONFIGS / "invalid").glob("*.yaml"))
VALID = sorted((CONFIGS / "valid").glob("*.yaml"))


def expected_problems(path: Path) -> list[str]:
    text = path.read_bytes().decode(errors="replace")  # not_utf8.yaml is not
    return [line.removeprefix("# expect: ") for line in text.splitlines() if line.startswith("# expect: ")]


def test_there_is_a_case_for_every_message_kind() -> None:
    assert len(INVALID) >= 20


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_config_names_the_key_path(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDECAR_TEST_UNSET_VARIABLE", raising=False)
    expected = expected_problems(path)
    assert expected, f"{path.name} has no '# expect:' line"
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    assert failure.value.problems == expected


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_defaults_are_the_contract_ports() -> None:
    config = load_config(CONFIGS / "valid" / "minimal.yaml")
    assert (config.listen, config.admin_listen, config.ops_listen) == (
        "127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:9464")
    assert config.models["chat"].timeout_ms == 30_000
    backend = config.models["chat"].backends[0]
    assert (backend.weight, backend.priority) == (1.0, 0)


def test_health_listen_is_off_unless_set() -> None:
    """No health-only listener by default; set, it takes an address like the other listeners."""
    assert load_config(CONFIGS / "valid" / "minimal.yaml").health_listen is None
    model = "models: {chat: {backends: [{name: a, address: 'h:1'}]}}\n"
    assert parse_config("health_listen: 0.0.0.0:50053\n" + model, environ={}).health_listen == "0.0.0.0:50053"
    # port 0 (a free port, as tests bind) may repeat, like on the other listeners
    both_free = "health_listen: 127.0.0.1:0\nops_listen: 127.0.0.1:0\n" + model
    assert parse_config(both_free, environ={}).health_listen == "127.0.0.1:0"
    with pytest.raises(ConfigError) as failure:
        parse_config("health_listen: localhost\n" + model, environ={})
    assert failure.value.problems == ["health_listen: must be host:port with a port from 0 to 65535"]


@pytest.mark.parametrize("other", ["listen", "admin_listen", "ops_listen"])
def test_health_listen_must_differ_from_every_other_listener(other: str) -> None:
    text = f"{other}: 127.0.0.1:50053\nhealth_listen: 127.0.0.1:50053\nmodels: {{chat: {{backends: [{{name: a, address: 'h:1'}}]}}}}"
    with pytest.raises(ConfigError) as failure:
        parse_config(text, environ={})
    assert failure.value.problems == [
        "(root): listen, admin_listen, ops_listen and health_listen must be different addresses"]


def test_prefix_affinity_takes_256_bytes_unless_told_and_its_bounds_are_inclusive() -> None:
    def model(keys: str) -> str:
        return f"models: {{chat: {{{keys}backends: [{{name: a, address: 'h:1'}}]}}}}"

    chat = parse_config(model("affinity: prefix, "), environ={}).models["chat"]
    assert (chat.affinity, chat.prefix_bytes) == ("prefix", 256)
    for bound in (1, 65536):
        assert parse_config(model(f"affinity: prefix, prefix_bytes: {bound}, "), environ={}).models[
            "chat"].prefix_bytes == bound
    assert parse_config(model(""), environ={}).models["chat"].affinity == "none"  # off by default


def test_env_substitution_with_and_without_defaults() -> None:
    text = (CONFIGS / "valid" / "full.yaml").read_text()
    config = parse_config(text, environ={"SIDECAR_TEST_BACKEND_B": "10.0.0.9:7000"})
    assert config.listen == "127.0.0.1:50051"  # the default after :-
    assert config.models["chat"].backends[1].address == "10.0.0.9:7000"
    assert parse_config(text, environ={"SIDECAR_TEST_LISTEN": "127.0.0.1:1"}).listen == "127.0.0.1:1"


def test_env_values_are_validated_like_literals() -> None:
    text = "models: {chat: {timeout_ms: '${T}', backends: [{name: a, address: 'h:1'}]}}"
    assert parse_config(text, environ={"T": "250"}).models["chat"].timeout_ms == 250
    with pytest.raises(ConfigError) as failure:
        parse_config(text, environ={"T": "-1"})
    assert failure.value.problems == ["models.chat.timeout_ms: must be > 0"]


def test_config_is_immutable() -> None:
    config = load_config(CONFIGS / "valid" / "minimal.yaml")
    with pytest.raises(ValidationError):
        config.listen = "127.0.0.1:1"  # type: ignore[misc]


def test_unreadable_file() -> None:
    with pytest.raises(ConfigError) as failure:
        load_config("/nonexistent/sidecar.yaml")
    assert failure.value.problems[0].startswith("/nonexistent/sidecar.yaml: cannot read")


@pytest.mark.parametrize(("loc", "path"), [
    (("models", "chat", "backends", 1, "weight"), "models.chat.backends[1].weight"),
    ((), "(root)"),
    (("listen",), "listen"),
    (("models", " chat", "timeout_ms"), 'models." chat".timeout_ms'),  # keys come from the file: quoted
    (("a\nb", ""), '"a\\nb".""'),
    (("k" * 100,), "k" * 77 + "..."),
])
def test_key_path(loc: tuple[str | int, ...], path: str) -> None:
    assert key_path(loc) == path


def test_check_config_command_prints_one_line_per_error_and_exits_2() -> None:
    path = CONFIGS / "invalid" / "several_errors_at_once.yaml"
    result = subprocess.run([sys.executable, "-m", "sidecar", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout.splitlines() == expected_problems(path)


def test_check_config_command_accepts_a_valid_file() -> None:
    path = CONFIGS / "valid" / "full.yaml"
    result = subprocess.run([sys.executable, "-m", "sidecar", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{path}: ok"


def test_run_refuses_an_invalid_config_with_exit_2(tmp_path: Path) -> None:
    path = CONFIGS / "invalid" / "weight_negative.yaml"
    result = subprocess.run([sys.executable, "-m", "sidecar", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "models.chat.backends[1].weight: must be >= 0" in result.stderr


def test_the_documented_example_is_valid() -> None:
    """docs/configuration.md's example must stay a config the sidecar accepts."""
    doc = (CONFIGS.parent.parent / "docs" / "configuration.md").read_text()
    example = doc.split("## Example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    digest = "a" * 64
    config = parse_config(example, environ={"APP1_KEY_SHA256": digest, "OPS_TOKEN_SHA256": "b" * 64})
    assert config.limits.store == "redis" and config.budgets.orgs["acme"].tokens_per_day == 5_000_000
    assert config.auth is not None and config.auth.admin_tokens[0].id == "ops"


def test_the_documented_limits_are_the_code_s() -> None:
    """docs/configuration.md, "Limits of a config file", states the bounds the code enforces."""
    from sidecar import config_sections as sections
    from sidecar import config_yaml

    doc = (CONFIGS.parent.parent / "docs" / "configuration.md").read_text()
    limits = doc.split("## Limits of a config file", 1)[1].split("\n## ", 1)[0]
    assert f"1 MiB ({config_yaml.MAX_CONFIG_BYTES} bytes)" in limits
    assert f"{config_yaml.MAX_NODES:,} values" in limits and f"{config_yaml.MAX_DEPTH} lists and mappings" in limits
    assert f"at most {config_yaml.MAX_NUMBER_CHARS} characters" in limits
    for value in (sections.MAX_MS, sections.MAX_SECONDS, sections.MAX_WEIGHT, sections.MAX_COUNT, sections.MAX_INT32):
        assert f"| {value} (" in limits or f"| {value} |" in limits, value
    assert f"| `models.<m>.prefix_bytes` | {sections.MAX_PREFIX_BYTES} |" in limits
    assert sections.MAX_AMOUNT == 10**15 and "10^15" in limits
    assert sections.MAX_DISK_BYTES == 2**50 and "2^50" in limits
