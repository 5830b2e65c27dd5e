"""What must hold whenever a sidecar is idle, however its calls ended: checked after the chaos,
cancellation and fault tests (`assert_invariants`), through the public interface only.

1. Nothing is left in flight: `/readyz` shows no call running (`calls.in_flight`) and no
   attempt on any backend (`backends.in_flight`).
2. Every reservation is settled: what an org's token budget has consumed equals the tokens of
   its usage records. The consumed amount is read back from the sidecar itself: a call asking
   for more than any budget is denied with a `QuotaFailure` that says how much was used.
3. One usage record per authenticated call: each request id the test sent has exactly one.
4. The usage spool's accounted bytes equal its files' sizes (`spool_checks`, once it is idle).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from tests.harness.procs import wait_until
from tests.harness.sidecar import SidecarProc
from tests.harness.spool_checks import wait_spool_accounted

INFER = "/inference.v1.Inference/Infer"
_USED = re.compile(r": (\d+) used, ")




def in_flight(sidecar: SidecarProc) -> tuple[int, dict[str, dict[str, int]]]:
    components = sidecar.readyz()[1]["components"]
    return components["calls"]["in_flight"], components["backends"]["in_flight"]


def assert_idle(sidecar: SidecarProc, timeout: float = 15.0) -> None:
    """Invariant 1 (waits: a call the test cancelled may still be ending inside the sidecar)."""
    def idle() -> bool:
        calls, backends = in_flight(sidecar)
        return calls == 0 and all(n == 0 for group in backends.values() for n in group.values())
    wait_until(idle, timeout, what=f"nothing in flight (last seen: {in_flight(sidecar)})")


def budget_used(target: str, api_key: str, model: str = "chat") -> int:
    """What the key's org has consumed of its token budget, as the sidecar's denial reports it."""
    request = InferRequest(model=model, input="x", max_output_tokens=2**32 - 1).SerializeToString()
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(INFER)(request, metadata=(("x-api-key", api_key),), timeout=10)
        except grpc.RpcError as error:
            detail = error_detail(error)
        else:
            raise AssertionError("a call asking for 2^32-1 output tokens was admitted: is there a budget?")
    assert detail.reason == "BUDGET_EXCEEDED", detail
    failure = next(d for d in detail.details if isinstance(d, error_details_pb2.QuotaFailure))
    match = _USED.search(failure.violations[0].description)
    assert match is not None, failure.violations[0].description
    return int(match.group(1))


def billed_tokens(records: Iterable[dict[str, Any]], org: str) -> int:
    return sum(int(r.get("input_tokens", 0)) + int(r.get("output_tokens", 0)) for r in records if r["org"] == org)


def assert_budget_settled(target: str, api_key: str, org: str, records: Iterable[dict[str, Any]],
                          timeout: float = 10.0) -> None:
    """Invariant 2 for one org (waits: settlements to a shared store are batched)."""
    expected = billed_tokens(records, org)
    wait_until(lambda: budget_used(target, api_key) == expected, timeout,
               what=f"org {org}'s budget consumption == its usage records' {expected} tokens")


def assert_one_record_each(records: Callable[[], list[dict[str, Any]]], request_ids: Iterable[str],
                           timeout: float = 10.0) -> None:
    """Invariant 3 (waits: records are written in batches)."""
    wanted = list(request_ids)

    def wrong() -> dict[str, int]:
        counts = Counter(r["request_id"] for r in records())
        return {rid: counts.get(rid, 0) for rid in wanted if counts.get(rid, 0) != 1}
    try:
        wait_until(lambda: not wrong(), timeout, what="one usage record per request id")
    except TimeoutError:
        raise AssertionError(f"request ids without exactly one usage record: {wrong()}") from None


def file_records(path: Path) -> list[dict[str, Any]]:
    """The records of a `usage.sink: file` sidecar (every rotated file included)."""
    files = sorted(path.parent.glob(path.name + "*"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line]


def assert_invariants(sidecar: SidecarProc, *, records: Callable[[], list[dict[str, Any]]] | None = None,
                      request_ids: Iterable[str] = (), budget: tuple[str, str] | None = None,
                      spool_dir: Path | None = None) -> None:
    """Every invariant that applies: `records` reads the usage records back; `budget` is the
    (api key, org) of an org with a token budget; `spool_dir` a Kafka sink's spool."""
    assert_idle(sidecar)
    if records is not None:
        assert_one_record_each(records, request_ids)
        if budget is not None:
            key, org = budget
            assert_budget_settled(sidecar.listen, key, org, records())
    if spool_dir is not None:
        wait_spool_accounted(spool_dir, sidecar.ops_url)
