"""Config fuzzing: generated malformed configs through `sidecar check-config`'s own code path
(`sidecar.cli.main`, in this process). Whatever the input — random YAML structures, wrong types,
huge, infinite and NaN numbers, duplicate keys, deep nesting, aliases, random bytes — the answer
is exit 0, or exit 2 with one `key.path: message` line per problem; never a traceback.

The few cases that go through real processes (`check-config`, `run`, SIGHUP) are in
tests/integration/test_config_hostile.py. Each test here is bounded by `max_examples`; the
counts are in `INPUTS` (printed with `-s`).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.cli import main
from sidecar.config_sections import MAX_AMOUNT, MAX_COUNT, MAX_MS, MAX_WEIGHT

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE: dict[str, Any] = yaml.safe_load((CONFIGS / "valid" / "full.yaml").read_text())
BASE.update({  # the sections full.yaml leaves out (usage paths are only looked at, never created)
    "usage": {"sink": "none", "file": {"path": "var/usage.jsonl", "max_bytes": 4096, "backups": 2},
              "spool_dir": "var/spool", "kafka": {"topic": "t", "linger_ms": 5,
                                                  "properties": {"security.protocol": "plaintext", "socket.timeout.ms": 100}}},
    "telemetry": {"otlp_endpoint": "", "otlp_headers": {"x-key": "k"}, "sample_ratio": 0.5,
                  "resource_attributes": {"k8s.pod.name": "p"}},
    "audit": {"store": "memory", "max_records": 10},
})
# SIDECAR_CONFIG_FUZZ_EXAMPLES=5000 for a longer hunt; 150 keeps the suite quick
FUZZ = settings(max_examples=int(os.environ.get("SIDECAR_CONFIG_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# a problem line: a key path (or the file's path), ": ", a message; one line, no traceback
PROBLEM = re.compile(r"^\S.*?: \S.*$")
INPUTS: Counter[str] = Counter()

# numeric keys, the largest value each takes (None: only the shared float/int checks apply)
NUMERIC = {
    ("models", "chat", "timeout_ms"): MAX_MS,
    ("models", "chat", "backends", 0, "weight"): MAX_WEIGHT,
    ("models", "chat", "backends", 0, "priority"): MAX_COUNT,
    ("models", "chat", "backends", 0, "max_in_flight"): MAX_COUNT,
    ("limits", "orgs", "acme", "requests_per_minute"): MAX_AMOUNT,
    ("limits", "orgs", "acme", "models", "chat", "burst"): MAX_AMOUNT,
    ("budgets", "orgs", "acme", "cost_per_day"): MAX_AMOUNT,
    ("budgets", "prices", "chat", "input_per_1k"): MAX_AMOUNT,
    ("retries", "budget_percent"): 100,
    ("shutdown", "grace_ms"): MAX_MS,
    ("health_checks", "unhealthy_threshold"): MAX_COUNT,
    ("max_message_bytes",): 2**31 - 1,
    ("usage", "kafka", "linger_ms"): MAX_MS,
    ("usage", "file", "backups"): MAX_COUNT,
    ("telemetry", "sample_ratio"): 1,
    ("audit", "max_records"): MAX_COUNT,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    print(f"\nconfig fuzz inputs: {dict(INPUTS)}, total {sum(INPUTS.values())}")


def check_config(path: Path, data: bytes, kind: str) -> tuple[int, list[str]]:
    """`sidecar check-config FILE` in this process: (exit code, stdout lines). Anything but a
    clean exit 0/2 (an exception) fails the test with its traceback."""
    INPUTS[kind] += 1
    path.write_bytes(data)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(["check-config", str(path)])
    code = exited.value.code
    lines = out.getvalue().splitlines()
    assert code in (0, 2), (code, lines)
    if code == 0:
        assert lines == [f"{path}: ok"]
    else:
        assert lines and all(PROBLEM.match(line) for line in lines), lines
        assert not any("Traceback" in line for line in lines)
    return int(code), lines


def dump(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def set_path(data: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """A copy of `data` with `value` at `path` (made where missing)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, list) and isinstance(head, int):
        copy = list(data)
        copy[head] = set_path(copy[head], rest, value)
        return copy
    copy_map = dict(data) if isinstance(data, dict) else {}
    copy_map[head] = set_path(copy_map.get(head), rest, value)
    return copy_map


def leaf_paths(data: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(data, dict):
        return [path, *(p for k, v in data.items() for p in leaf_paths(v, (*path, k)))]
    if isinstance(data, list):
        return [path, *(p for i, v in enumerate(data) for p in leaf_paths(v, (*path, i)))]
    return [path]


def dotted(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


PATHS = leaf_paths(BASE)
KEYS = sorted({p for path in PATHS for p in path if isinstance(p, str)})
scalars = (st.none() | st.booleans() | st.integers(-(10**40), 10**40) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["${HOME}", "${NOPE_UNSET}", "0x1F", "1e400", ".nan", "2020-13-45"]))
values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=4),
                      max_leaves=20)


@FUZZ
@given(path=st.sampled_from(PATHS), value=values)
def test_any_value_at_any_key(workdir: Path, path: tuple[str | int, ...], value: Any) -> None:
    check_config(workdir / "value.yaml", dump(set_path(BASE, path, value)), "random value at a real key")


@FUZZ
@given(structure=values)
def test_random_structures(workdir: Path, structure: Any) -> None:
    code, _ = check_config(workdir / "structure.yaml", dump(structure), "random structure")
    assert code == 2  # never a config: no models


hostile_numbers = st.sampled_from([True, False, math.inf, -math.inf, math.nan, 10**29, 10**16, -1, 2**63, -(2**64)])


@FUZZ
@given(path=st.sampled_from(sorted(NUMERIC, key=str)), value=hostile_numbers, spelled=st.booleans())
def test_hostile_numbers_are_refused_by_key_path(workdir: Path, path: tuple[str | int, ...], value: Any,
                                                 spelled: bool) -> None:
    """true/false, infinities, NaN, and numbers past the key's bound (or negative), written as
    YAML numbers or (`spelled`) as the strings an `${ENV}` reference would give."""
    text = dump(set_path(BASE, path, value))
    if spelled and not isinstance(value, bool):
        literal = "nan" if isinstance(value, float) and math.isnan(value) else {
            math.inf: "inf", -math.inf: "-inf"}.get(value, str(value))
        text = dump(set_path(BASE, path, "${X:-" + literal + "}"))
    code, lines = check_config(workdir / "number.yaml", text, "hostile number")
    assert code == 2 and any(line.startswith(f"{dotted(path)}: ") for line in lines), lines


def content_column(line: str) -> int:
    """Where a block-style line's key starts (after its indentation and list dashes)."""
    return len(line) - len(line.lstrip(" -"))


@FUZZ
@given(data=st.data())
def test_duplicate_keys_are_refused_by_key_path(workdir: Path, data: st.DataObject) -> None:
    lines = dump(BASE).decode().splitlines()
    keyed = [i for i, line in enumerate(lines) if re.match(r"^[ -]*[\w.-]+:", line)]
    i = data.draw(st.sampled_from(keyed))
    column = content_column(lines[i])
    key = lines[i].strip(" -").split(":", 1)[0]
    # the same key again in the same mapping, after the first one's value (its lines nested deeper)
    end = next((j for j in range(i + 1, len(lines)) if content_column(lines[j]) <= column), len(lines))
    again = " " * column + f"{key}: {data.draw(st.sampled_from(['1', 'x', '[]', '{}', 'null']))}"
    text = "\n".join([*lines[:end], again, *lines[end:]]) + "\n"
    code, problems = check_config(workdir / "duplicate.yaml", text.encode(), "duplicate key")
    assert code == 2
    assert any(re.match(rf"^(\S*\.)?{re.escape(key)}: duplicate key \(first on line {i + 1}\)", p) for p in problems), \
        (again, problems)


@FUZZ
@given(depth=st.integers(33, 5000), kind=st.sampled_from(["list", "map", "block"]))
def test_deep_nesting_is_refused(workdir: Path, depth: int, kind: str) -> None:
    if kind == "list":
        text = "models: " + "[" * depth + "]" * depth
    elif kind == "map":
        text = "models: " + "{a: " * depth + "1" + "}" * depth
    else:
        text = "".join(" " * i + f"k{i}:\n" for i in range(min(depth, 1000)))
    code, lines = check_config(workdir / "deep.yaml", text.encode(), "deep nesting")
    assert code == 2 and len(lines) == 1 and ("nested deeper" in lines[0] or "nesting depth" in lines[0]), lines


@FUZZ
@given(levels=st.integers(1, 12), width=st.integers(1, 12), where=st.sampled_from(PATHS))
def test_aliases_are_expanded_within_bounds(workdir: Path, levels: int, width: int,
                                            where: tuple[str | int, ...]) -> None:
    """Nested aliases (`width` ** `levels` leaves): within the node bound they are ordinary
    values (refused or not by their key), past it one line naming the bound."""
    anchors = [f"&l0 [{', '.join(['1'] * width)}]"]
    anchors += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    text = dump(set_path(BASE, where, "PLACEHOLDER")).decode()
    head = "".join(f"x-anchor{i}: {a}\n" for i, a in enumerate(anchors))
    text = head + text.replace("PLACEHOLDER", f"*l{levels - 1}", 1)
    code, lines = check_config(workdir / "alias.yaml", text.encode(), "alias expansion")
    assert code == 2  # x-anchor keys are unknown at least
    if width ** levels > 200_000:
        assert len(lines) == 1 and "more than 200000 values" in lines[0], lines


@FUZZ
@given(blob=st.binary(max_size=3000))
def test_random_bytes(workdir: Path, blob: bytes) -> None:
    check_config(workdir / "bytes.yaml", blob, "random bytes")


@FUZZ
@given(data=st.data())
def test_random_bytes_inside_a_valid_config(workdir: Path, data: st.DataObject) -> None:
    text = (CONFIGS / "valid" / "full.yaml").read_bytes()
    at = data.draw(st.integers(0, len(text)))
    blob = data.draw(st.binary(min_size=1, max_size=8))
    check_config(workdir / "spliced.yaml", text[:at] + blob + text[at:], "bytes spliced into a config")


YAML_CHARS = st.sampled_from(list("{}[]:,-?&*!|>'\"%@`#\n\t .0123456789abcxyz<=\\") + ["\n  ", ": ", "- ", "&a ", "*a"])


@FUZZ
@given(pieces=st.lists(YAML_CHARS, max_size=120))
def test_random_yaml_syntax(workdir: Path, pieces: list[str]) -> None:
    check_config(workdir / "syntax.yaml", "".join(pieces).encode(), "random YAML syntax")
