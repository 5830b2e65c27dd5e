"""Log lines: JSON and text rendering, and the access log's batched lines."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from sidecar.call import AttemptRecord, begin_call
from sidecar.config import parse_config
from sidecar.telemetry.logging import ACCESS_FLUSH_SECONDS, AccessLog, LineFormatter, render_json, render_text


def record(**extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord({"name": "sidecar.test", "levelname": "WARNING", "msg": "backend %s",
                                  "args": ("unhealthy",), "created": 1_764_058_879.25})
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_json_lines_carry_the_extra_fields() -> None:
    line = json.loads(LineFormatter(render_json).format(record(model="chat", backend="a")))
    assert line == {"ts": "2025-11-25T08:21:19.250Z", "level": "warning", "logger": "sidecar.test",
                    "msg": "backend unhealthy", "model": "chat", "backend": "a"}


def test_text_lines_read_left_to_right_and_quote_what_has_spaces() -> None:
    text = LineFormatter(render_text).format(record(model="chat", detail="two words", n=3))
    assert text == '2025-11-25T08:21:19.250Z WARNING sidecar.test: backend unhealthy model=chat detail="two words" n=3'


def config(telemetry: str) -> object:
    return parse_config(f"telemetry: {telemetry}\nmodels:\n  chat:\n    backends: [{{name: a, address: '127.0.0.1:1'}}]\n")


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_access_log_writes_one_line_per_call_in_batches(log_format: str, capsys: pytest.CaptureFixture[str],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.access")
    current = config(f"{{log_format: {log_format}}}")
    access = AccessLog(lambda: current)  # type: ignore[arg-type, return-value]

    async def calls() -> str:
        for i in range(3):
            call = begin_call("Infer", b"", (("x-request-id", f"req-{i}"), ("x-api-key", "sk-never")), None)
            call.request = InferRequest(model="chat")
            call.org, call.api_key_id, call.status = "acme", "app-1", "OK"
            call.attempts.append(AttemptRecord("a", "OK", 1.5))
            access(call)
        written_at_once = capsys.readouterr().err
        await asyncio.sleep(ACCESS_FLUSH_SECONDS * 3)
        assert written_at_once == ""  # nothing on the call path
        return capsys.readouterr().err

    lines = asyncio.run(calls()).splitlines()
    assert len(lines) == 3 and "sk-never" not in "".join(lines)
    if log_format == "json":
        first = json.loads(lines[0])
        assert (first["logger"], first["request_id"], first["org"], first["backend"], first["attempts"]) == (
            "sidecar.access", "req-0", "acme", "a", 1)
        assert len(first["trace_id"]) == 32 and len(first["span_id"]) == 16
    else:
        assert " INFO    sidecar.access: call request_id=req-0 " in lines[0] and " org=acme " in lines[0]


@pytest.mark.parametrize(("setting", "level"), [("{access_log: false}", logging.INFO), ("{}", logging.WARNING)])
def test_the_access_log_can_be_turned_off(setting: str, level: int, capsys: pytest.CaptureFixture[str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(level, logger="sidecar.access")
    current = config(setting)
    access = AccessLog(lambda: current)  # type: ignore[arg-type, return-value]

    async def one() -> None:
        access(begin_call("Infer", b"", (), None))
        await asyncio.sleep(ACCESS_FLUSH_SECONDS * 3)

    asyncio.run(one())
    assert capsys.readouterr().err == ""


def test_text_lines_cannot_be_split_by_a_callers_string() -> None:
    """A model name (or any caller-supplied value) with a newline stays on its line, escaped."""
    from sidecar.telemetry.logging import render_text

    line = render_text({"ts": "t", "level": "info", "logger": "sidecar.access", "msg": "call",
                        "model": "chat\nFAKE 2026 ERROR sidecar: forged", "org": "acme\x1b[31m"})
    assert "\n" not in line
    assert 'model="chat\\nFAKE 2026 ERROR sidecar: forged"' in line and 'org="acme\\u001b[31m"' in line
