"""Billing: the tokens a call is charged, decided once when it has ended.

Both things that charge a call read this one answer: the limit store's settlement (rates and
budgets, `stages/limits.py`) and the usage record (`usage/record.py`), so what Redis counted
and what the usage pipeline bills always agree. Per attempt:

1. the attempt that answered (status OK) is billed the usage the backend reported in its answer
   (the response, or a stream's last chunk), each count clamped to the call's cap when it is
   read (`read_usage`);
2. an answer without readable usage (no `usage` field, bytes that do not parse, a stream cut
   after chunks went out) is billed the estimate, and flagged `usage_estimated`;
3. a failed or cancelled attempt is billed the estimate when the backend may have worked on it:
   every ending except the codes that say it never started (`NOT_STARTED`: it was unreachable,
   shed the call, or refused the request). This includes an attempt that failed and was retried
   on another backend: DEADLINE_EXCEEDED, INTERNAL, UNKNOWN and ABORTED usually come after the
   backend began generating, and a caller who leaves mid-call has made the backend work;
4. an attempt that ended with a `NOT_STARTED` code before anything reached the caller is free.

The estimate is what the call reserved: its input size at `BYTES_PER_TOKEN` plus its
`max_output_tokens` (the model's default when the request sets none).

A call is also billed one request (a model's `per_request` price) when any of its attempts is
billed by the rules above, and none when no backend worked on it.

Open Inference Protocol calls carry no token usage: their estimate is 0 tokens, and their answer
is not parsed (a 1 MiB tensor is relayed, not read): they are billed 0 tokens, not estimated,
and one request. Token counts a backend may put in the response's `parameters` are not used.
"""
from __future__ import annotations

import logging

from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferResponse

from sidecar.call import OIP, Billed, Call
from sidecar.limits.budget import estimate_tokens
from sidecar.telemetry.metrics import BACKEND_USAGE_CLAMPED

log = logging.getLogger("sidecar.billing")

# codes after which the backend did not work on the attempt: it was not reached, refused the
# call (load shedding, validation, auth) or does not serve the method. The codes safe to retry.
NOT_STARTED = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED", "INVALID_ARGUMENT", "NOT_FOUND",
                         "PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION", "ALREADY_EXISTS",
                         "OUT_OF_RANGE"})
INPUT_TOKEN_ALLOWANCE = 4096    # input tokens a backend may count beyond one per input byte (templates)
DEFAULT_MAX_OUTPUT_TOKENS = 32_768  # output cap of a request that sets no max_output_tokens


class Garbled(Exception):
    """The backend's answer is not a valid message of the method's response type."""


def read_usage(call: Call, answer: bytes) -> None:
    """Reads the usage of the backend's final answer into `call.reported`, clamped to the call's
    cap; raises `Garbled` when the bytes do not parse. Called by the proxy once per answered
    call, before the answer (or a stream's end) reaches the caller. An OIP answer is relayed
    unread: it reports no tokens (0, 0)."""
    if call.protocol == OIP:
        call.reported = (0, 0)
        return
    try:
        message = (InferChunk if call.streamed else InferResponse).FromString(answer)
    except Exception as exc:  # noqa: BLE001 - any parse failure (DecodeError, or worse) is garbage
        raise Garbled(type(exc).__name__) from None
    if not message.HasField("usage"):
        return
    reported = message.usage.input_tokens, message.usage.output_tokens
    cap_in, cap_out = usage_cap(call)
    clamped = min(reported[0], cap_in), min(reported[1], cap_out)
    if clamped != reported:
        _clamped(call, reported, (cap_in, cap_out))
        call.usage_clamped = True
    call.reported = clamped


def usage_cap(call: Call) -> tuple[int, int]:
    """The most (input, output) tokens one call can honestly have used: the model's
    `max_reported_*_tokens`, or by default one token per input byte plus an allowance, and the
    request's `max_output_tokens` (else `DEFAULT_MAX_OUTPUT_TOKENS`)."""
    assert call.model is not None
    request, model = call.request, call.model
    cap_in = model.max_reported_input_tokens or (
        len(request.input.encode()) + len(request.input_bytes) + INPUT_TOKEN_ALLOWANCE)
    cap_out = model.max_reported_output_tokens or request.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS
    return cap_in, cap_out


def _clamped(call: Call, reported: tuple[int, int], cap: tuple[int, int]) -> None:
    backend = call.endpoint.name if call.endpoint is not None else ""
    BACKEND_USAGE_CLAMPED.labels(call.request.model, backend).inc()
    detail = f"reported {reported[0]}/{reported[1]} input/output tokens; billed at most {cap[0]}/{cap[1]}"
    call.decide("usage", "clamped", detail)
    log.warning("backend reported more usage than the call could use; clamped",
                extra={"request_id": call.request_id, "model": call.request.model, "backend": backend,
                       "reported_input_tokens": reported[0], "reported_output_tokens": reported[1],
                       "cap_input_tokens": cap[0], "cap_output_tokens": cap[1]})


def bill(call: Call) -> Billed:
    """What the ended call is charged (the module docstring's rules); computed once."""
    if call.billed is not None:
        return call.billed
    input_tokens = output_tokens = requests = 0
    estimated = False
    last = len(call.attempts) - 1
    for i, attempt in enumerate(call.attempts):
        answered = i == last and attempt.status == "OK"
        if answered and call.reported is not None:
            used = call.reported
            estimated = estimated or call.usage_clamped
        elif answered or (i == last and call.relayed) or attempt.status not in NOT_STARTED:
            used = _estimate(call)
            estimated = True
        else:
            continue
        input_tokens += used[0]
        output_tokens += used[1]
        requests = 1
    call.billed = Billed(input_tokens, output_tokens, estimated, requests)
    return call.billed


def _estimate(call: Call) -> tuple[int, int]:
    assert call.model is not None
    if call.protocol == OIP:
        return 0, 0
    request = call.request
    return estimate_tokens(request.input, request.input_bytes,
                           request.max_output_tokens or call.model.default_max_output_tokens)
