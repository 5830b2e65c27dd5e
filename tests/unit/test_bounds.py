"""The bounds on caller and admin strings, as pure functions: `errors.longer_than` / `clip`, the
checks of `begin_call` and `Call.parse`, `rescue()`'s cut echoes, `overrides.problem`."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from sidecar.call import MAX_MODEL_BYTES, MAX_TRACESTATE_CHARS, begin_call
from sidecar.config_sections import MAX_WEIGHT
from sidecar.errors import STATUS_DETAILS_KEY, SidecarError, clip, longer_than, rescue
from sidecar.routing.overrides import MAX_TTL_SECONDS, Override, OverrideTable, problem


@settings(derandomize=True, max_examples=300, database=None)
@given(text=st.text(max_size=600), limit=st.integers(4, 512))
def test_longer_than_and_clip_count_utf8_bytes(text: str, limit: int) -> None:
    size = len(text.encode())
    assert longer_than(text, limit) == (size > limit)
    cut = clip(text, limit)
    assert len(cut.encode()) <= limit
    assert cut == text if size <= limit else (cut.endswith("…") and text.startswith(cut[:-1]))


def refusal_field(method: str, raw: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> str | None:
    call = begin_call(method, raw, metadata, None)
    try:
        call.parse()
    except SidecarError as exc:
        assert call.request.model == ""  # a refused request is not kept for the finishers
        return exc.metadata.get("field")
    return None


def test_parse_bounds_model_and_session_in_bytes() -> None:
    assert refusal_field("Infer", InferRequest(model="m" * MAX_MODEL_BYTES).SerializeToString()) is None
    assert refusal_field("Infer", InferRequest(model="m" * (MAX_MODEL_BYTES + 1)).SerializeToString()) == "model"
    assert refusal_field("Infer", InferRequest(model="漢" * 86).SerializeToString()) == "model"  # 258 bytes
    assert refusal_field("Infer", InferRequest(model="chat", session_id="s" * 257).SerializeToString()) \
        == "session_id"


def test_begin_call_bounds_trace_context() -> None:
    raw = InferRequest(model="chat").SerializeToString()
    assert refusal_field("Infer", raw, (("traceparent", "x" * 257),)) == "traceparent"
    assert refusal_field("Infer", raw, (("tracestate", "a=" + "b" * (MAX_TRACESTATE_CHARS - 2)),)) is None
    assert refusal_field("Infer", raw, (("tracestate", "a=b"),) * 200) == "tracestate"
    call = begin_call("Infer", raw, (("x-request-id", "r" * 129),), None)
    assert len(call.request_id) == 32  # an over-long request id is replaced, not refused


def test_rescue_cuts_long_echoes() -> None:
    rescued = rescue(SidecarError("NOT_FOUND", "é" * 5000, metadata={"model": "m" * 5000, "short": "ok"}), "r")
    assert len(rescued.message.encode()) <= 1024 and rescued.message.endswith("…")
    raw = dict(rescued.trailing_metadata)[STATUS_DETAILS_KEY]
    assert isinstance(raw, bytes)
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(info)
    assert len(info.metadata["model"]) <= 256 and info.metadata["short"] == "ok"


@pytest.mark.parametrize(("changes", "field"), [
    ({}, None),
    ({"weight": MAX_WEIGHT}, None),
    ({"weight": math.inf}, "weight"),
    ({"weight": math.nan}, "weight"),
    ({"weight": -0.5}, "weight"),
    ({"weight": MAX_WEIGHT + 1}, "weight"),
    ({"ttl_seconds": MAX_TTL_SECONDS}, None),
    ({"ttl_seconds": MAX_TTL_SECONDS + 1}, "ttl_seconds"),
    ({"reason": "r" * 512}, None),
    ({"reason": "r" * 513}, "reason"),
    ({"reason": "tab\tis fine"}, None),
    ({"reason": "a\nforged log line"}, "reason"),
    ({"model": "m" * 300}, "model"),
    ({"backend": "b" * 300}, "backend"),
])
def test_override_bounds(changes: dict[str, object], field: str | None) -> None:
    fields: dict[str, object] = {"model": "chat", "backend": "a", "action": "weight", "weight": 2.0, **changes}
    found = problem(Override(**fields))  # type: ignore[arg-type]
    assert (found[0] if found else None) == field


async def test_overrides_read_back_out_of_bounds_are_ignored(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A file written by hand (or a Redis hash by an older sidecar) with weight Infinity."""
    path = tmp_path / "overrides.json"
    path.write_text(json.dumps({"overrides": [
        {"model": "chat", "backend": "a", "action": "weight", "weight": math.inf},
        {"model": "chat", "backend": "b", "action": "drain"}]}))
    table = OverrideTable(path)
    with caplog.at_level(logging.ERROR, logger="sidecar.routing"):
        assert await table.load(0.0)
        assert not await table.load(0.0)
    assert [o.field for o in table.live(0.0)] == ["chat/b"]
    assert [r.msg for r in caplog.records] == ["routing overrides out of bounds ignored"]  # once
