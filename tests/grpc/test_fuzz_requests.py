"""Protobuf and metadata fuzzing through a real `sidecar run` in front of a demo backend.

Hypothesis builds what a hostile or broken caller sends: request bytes (random, truncated varints,
wrong wire types, huge length prefixes, mangled valid requests), model names, metadata (huge,
many, binary), `traceparent` values and deadlines from 1 ms to decades. Every call must end with
a normal answer or a catalog error (`google.rpc.ErrorInfo`, domain "sidecar", a reason of
`sidecar.errors.CATALOG`); the only answers without one are gRPC's own, where it refuses before
the sidecar sees the call: the caller's deadline passed, or the metadata is over gRPC's 8 KiB
limit. Afterwards a normal call still succeeds, RSS stayed bounded, and no key or admin token
is in any output (error messages, the log, usage records).

Deterministic: derandomized, no example database, fixed example counts (printed with -s).
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest, InferResponse

from sidecar.errors import BACKEND_ERROR, CATALOG
from tests.grpc.test_proxy import INFER, INFER_STREAM
from tests.grpc.test_stream_memory import rss_bytes
from tests.harness.sidecar import BackendProc, SidecarProc, sidecar_config, start_sidecar

KEY = "sk-fuzz-7c1d0e5b9a"
WRONG_KEY = "sk-fuzz-wrong-4b62"
ADMIN = "adm-fuzz-e81f3d"
SECRETS = (KEY, WRONG_KEY, ADMIN)
METADATA_LIMIT = 8 * 1024       # gRPC's default for received metadata (soft limit)
WATCHDOG_SECONDS = 60.0         # a call the sidecar never answers fails the test instead of hanging it
RSS_GROWTH_BOUND = 100 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", 32 * 1024 * 1024)]


@dataclass
class Target:
    sidecar: SidecarProc
    records: Path
    baseline_rss: int
    seen: Counter[str] = field(default_factory=Counter)  # outcome -> inputs, over the module


@pytest.fixture(scope="module")
def target(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("fuzz")
    records = workdir / "usage.jsonl"
    config = sidecar_config(f"""
        chat:
          timeout_ms: 2000
          affinity: session
          backends: [{{name: a, address: "{backend.address}"}}]
        """) + f"""auth:
  api_keys: [{{id: fuzz, sha256: "{hashlib.sha256(KEY.encode()).hexdigest()}", org: fuzzers}}]
  admin_tokens: [{{id: ops, sha256: "{hashlib.sha256(ADMIN.encode()).hexdigest()}"}}]
usage:
  sink: file
  file: {{path: {records}}}
"""
    proc = start_sidecar(workdir, config)
    try:
        assert normal_call(proc.listen)
        found = Target(proc, records, rss_bytes(proc.proc.pid))
        yield found
        print(f"\nfuzz outcomes over the module: {dict(sorted(found.seen.items()))}")
    finally:
        proc.proc.stop()


def normal_call(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(INFER)(InferRequest(model="chat", input="still serving").SerializeToString(),
                                         metadata=(("x-api-key", KEY),), timeout=30)
    return InferResponse.FromString(raw).output.startswith("still serving")


def metadata_size(metadata: tuple[tuple[str, str | bytes], ...]) -> int:
    """What gRPC counts against its metadata limit (HPACK: name + value + 32 an entry)."""
    return sum(len(k) + len(v) + 32 for k, v in metadata)


def run(target: Target, raw: bytes, *, stream: bool = False, timeout: float | None = 30.0,
        metadata: tuple[tuple[str, str | bytes], ...] = (("x-api-key", KEY),)) -> str:
    """One call; checks its outcome and returns its name (`OK`, a catalog reason, or gRPC's own)."""
    started = time.monotonic()  # before the call: its deadline counts from there
    with grpc.insecure_channel(target.sidecar.listen, options=OPTIONS) as channel:
        if stream:
            call = channel.unary_stream(INFER_STREAM)(raw, timeout=timeout, metadata=metadata)
        else:
            call = channel.unary_unary(INFER).future(raw, timeout=timeout, metadata=metadata)
        watchdog = threading.Timer(WATCHDOG_SECONDS, call.cancel)
        watchdog.start()
        try:
            if stream:
                for chunk in call:
                    InferChunk.FromString(chunk)
            else:
                InferResponse.FromString(call.result())
            outcome = "OK"
        except grpc.RpcError as error:
            outcome = _failure(error, time.monotonic() - started, timeout, metadata)
        except DecodeError:  # pragma: no cover - a relayed answer that is not the backend's
            pytest.fail("an answer that does not parse was relayed")
        finally:
            watchdog.cancel()
    target.seen[outcome] += 1
    return outcome


def _failure(error: grpc.RpcError, elapsed: float, timeout: float | None,
             metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    detail = error_detail(error)
    assert detail.code != grpc.StatusCode.CANCELLED, f"no answer within {WATCHDOG_SECONDS} s"
    assert not any(secret in detail.message for secret in SECRETS), detail
    if detail.domain == "sidecar":
        if detail.reason != BACKEND_ERROR:
            assert CATALOG.get(detail.reason) == detail.code, detail
        assert detail.reason in CATALOG or detail.reason == BACKEND_ERROR, detail
        assert all(len(v.encode()) <= 256 for v in detail.metadata.values()) and len(detail.message.encode()) <= 1024
        return detail.reason
    # gRPC's own answers, before or without the sidecar: only these two
    if detail.code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None and elapsed >= timeout * 0.9:
        return "grpc:DEADLINE_EXCEEDED"
    if detail.code == grpc.StatusCode.RESOURCE_EXHAUSTED and metadata_size(metadata) > METADATA_LIMIT - 1024:
        return "grpc:METADATA_TOO_LARGE"
    pytest.fail(f"an answer without a catalog error: {detail}")


def still_well(target: Target) -> None:
    """After a batch of hostile input: the process serves, holds little memory, and kept no secret."""
    assert target.sidecar.proc.alive()
    assert normal_call(target.sidecar.listen)
    growth = rss_bytes(target.sidecar.proc.pid) - target.baseline_rss
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth >> 20} MiB"
    outputs = target.sidecar.proc.log_path.read_text(errors="replace")
    if target.records.exists():
        outputs += target.records.read_text(errors="replace")
    assert not [secret for secret in SECRETS if secret in outputs]


FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- strategies ------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


names = st.one_of(
    st.sampled_from(["chat", "", "nope", "CHAT", "chat ", "chat\x00", "*", "../chat"]),
    st.text(max_size=40),
    st.text(min_size=250, max_size=270),                     # around the 256-byte bound
    st.text(alphabet="é漢😀", min_size=60, max_size=140),     # multi-byte: the bound counts bytes
    st.integers(1000, 200_000).map(lambda n: "m" * n),       # far past it
)
valid_requests = st.builds(
    InferRequest, model=names, input=st.text(max_size=64), input_bytes=st.binary(max_size=64),
    max_output_tokens=st.integers(0, 2**32 - 1), session_id=st.one_of(st.just(""), st.text(max_size=300)))


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """A valid request, then truncated, a byte changed, or garbage appended."""
    raw = draw(valid_requests.map(lambda r: r.SerializeToString()))
    how = draw(st.sampled_from(["truncate", "flip", "append"]))
    if how == "truncate" and raw:
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if how == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    return raw + draw(st.binary(min_size=1, max_size=16))


@st.composite
def crafted(draw: st.DrawFn) -> bytes:
    """Wire-format edge cases: a tag with any field number and wire type (6 and 7 do not exist,
    3/4 are groups), over-long and never-ending varints, length prefixes far past the data."""
    field_number = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 536_870_911]))
    wire_type = draw(st.integers(0, 7))
    tag = varint(field_number << 3 | wire_type)
    body = draw(st.sampled_from([
        b"\x80" * 11,                                   # a varint that never ends
        b"\xff" * 10 + b"\x01",                         # an 11-byte varint
        varint(2**31) + b"chat",                        # a length prefix of 2 GiB
        varint(2**64 - 1) + b"x",                       # the largest varint as a length
        varint(5) + b"ch",                              # a length past the end
        b"",
        b"\x04chat",
    ]))
    prefix = draw(st.sampled_from([b"", b"\x0a\x04chat"]))  # after a valid model, or alone
    return prefix + tag + body


request_bytes = st.one_of(st.binary(max_size=512), mangled(), crafted(),
                          valid_requests.map(lambda r: r.SerializeToString()))

printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
metadata_keys = st.one_of(
    st.sampled_from(["x-request-id", "traceparent", "tracestate", "authorization", "x-api-key",
                     "x-forwarded-for", "baggage"]),
    st.from_regex(r"\Ax-[a-z0-9_.\-]{1,30}\Z"),
)
metadata_value = st.one_of(st.text(printable, max_size=64), st.text(printable, min_size=500, max_size=4000))
entries = st.one_of(
    st.tuples(metadata_keys, metadata_value),
    st.tuples(st.from_regex(r"\Ax-[a-z0-9\-]{1,20}-bin\Z"), st.binary(max_size=256)),  # non-ASCII bytes
    st.tuples(st.sampled_from(["traceparent", "tracestate", "x-request-id"]).map(lambda k: k + "-bin"),
              st.binary(max_size=64)),
)
credentials = st.sampled_from([(("x-api-key", KEY),), (("authorization", f"Bearer {KEY}"),),
                               (("authorization", f"bearer  {KEY} "),), (("x-api-key", WRONG_KEY),),
                               (("authorization", WRONG_KEY),), ()])
metadata_lists = st.tuples(credentials, st.one_of(
    st.lists(entries, max_size=40),
    st.tuples(st.integers(100, 400), st.text(printable, max_size=16)).map(                 # many
        lambda n_value: [(f"x-many-{i}", n_value[1]) for i in range(n_value[0])]),
    st.tuples(metadata_keys, st.integers(6000, 40_000).map(lambda n: "v" * n)).map(lambda e: [e]),  # huge
)).map(lambda c: c[0] + tuple(c[1]))

TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
traceparents = st.one_of(
    st.sampled_from([f"00-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}-00", f"00-{TRACE.upper()}-{PARENT}-01",
                     f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01", f"ff-{TRACE}-{PARENT}-01",
                     f"00-{TRACE}-{PARENT}-01-extra", f"01-{TRACE}-{PARENT}-01-extra", f"00-{TRACE}-{PARENT}-zz",
                     f"cc-{TRACE}-{PARENT}-01-" + "f" * 300, "", "-" * 55]),
    st.text(printable, max_size=80),
    st.builds(lambda v, t, p, f: f"{v}-{t}-{p}-{f}", st.text("0123456789abcdefABCDEF", min_size=2, max_size=2),
              st.text("0123456789abcdef", min_size=31, max_size=33), st.text("0123456789abcdef", min_size=16,
                                                                               max_size=16),
              st.text("0123456789abcdefg", min_size=2, max_size=2)),
)
deadlines = st.one_of(st.floats(0.001, 0.05), st.floats(0.05, 5.0), st.floats(5.0, 1e5), st.floats(1e5, 3e9))


# --- the fuzz tests ---------------------------------------------------------------------------------


def test_request_bytes(target: Target) -> None:
    @settings(FUZZ, max_examples=600)
    @given(raw=request_bytes, stream=st.booleans())
    def one(raw: bytes, stream: bool) -> None:
        run(target, raw, stream=stream)

    one()
    still_well(target)


def test_model_names(target: Target) -> None:
    @settings(FUZZ, max_examples=200)
    @given(name=names, stream=st.booleans())
    def one(name: str, stream: bool) -> None:
        outcome = run(target, InferRequest(model=name).SerializeToString(), stream=stream)
        assert (outcome == "OK") == (name == "chat")

    one()
    still_well(target)


def test_metadata(target: Target) -> None:
    @settings(FUZZ, max_examples=300)
    @given(metadata=metadata_lists, stream=st.booleans())
    def one(metadata: tuple[tuple[str, str | bytes], ...], stream: bool) -> None:
        run(target, InferRequest(model="chat", input="hi").SerializeToString(), stream=stream, metadata=metadata)

    one()
    still_well(target)


def test_traceparent(target: Target) -> None:
    @settings(FUZZ, max_examples=150)
    @given(value=traceparents, stream=st.booleans())
    def one(value: str, stream: bool) -> None:
        outcome = run(target, InferRequest(model="chat").SerializeToString(), stream=stream,
                      metadata=(("x-api-key", KEY), ("traceparent", value)))
        assert outcome == ("OK" if len(value) <= 256 else "INVALID_REQUEST")  # a bad one starts a new trace

    one()
    still_well(target)


def test_deadlines(target: Target) -> None:
    @settings(FUZZ, max_examples=150)
    @given(timeout=deadlines, delay_ms=st.sampled_from([0, 20]), stream=st.booleans())
    def one(timeout: float, delay_ms: int, stream: bool) -> None:
        request = InferRequest(model="chat", input="hi")
        request.parameters.update({"delay_ms": delay_ms})
        outcome = run(target, request.SerializeToString(), stream=stream, timeout=timeout)
        assert outcome in ("OK", "grpc:DEADLINE_EXCEEDED", "BACKEND_TIMEOUT")

    one()
    still_well(target)
