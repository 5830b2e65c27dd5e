"""What the processes themselves counted, to cross-check load tools that can't see grpc-status.

- the sidecar: `grpc_server_handled_total` on its ops listener's `GET /metrics` (CONTRACT §8), and
  its own share of a call, the `api_router_sidecar_overhead_seconds` histogram;
- the demo backend: its `--log-calls` JSON lines (one per call, with the outcome).
"""
from __future__ import annotations

import json
import re
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
HANDLED = "grpc_server_handled_total"
OVERHEAD = "api_router_sidecar_overhead_seconds"


def scrape_handled(ops_address: str, method: str = "Infer") -> Counter[str] | None:
    """grpc_server_handled_total of `method` by grpc code; None if the metric isn't exposed (yet)."""
    try:
        with urllib.request.urlopen(f"http://{ops_address}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    counts: Counter[str] = Counter()
    found = False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match[1] != HANDLED:
            continue
        found = True
        labels = dict(_LABEL.findall(match[2] or ""))
        if labels.get("grpc_method", method) == method:
            code = labels.get("grpc_code", labels.get("code", "?"))
            counts[str(code)] += int(float(match[3]))
    return counts if found else None


def backend_outcomes(log: Path, offset: int) -> tuple[Counter[str], int]:
    """Outcomes of the backend's Infer calls logged after byte `offset`; returns them and the new offset."""
    counts: Counter[str] = Counter()
    with log.open("rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        if b'"event": "call"' in line:
            entry = json.loads(line)
            if entry.get("method") == "Infer":
                counts[entry["outcome"]] += 1
    return counts, offset + len(complete)


def delta(before: Counter[str] | None, after: Counter[str] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    after.subtract(before)
    return {k: v for k, v in after.items() if v}


def overhead_buckets(ops: str) -> dict[float, float]:
    """Cumulative counts of `api_router_sidecar_overhead_seconds` (Infer) by upper bound."""
    with urllib.request.urlopen(f"http://{ops}/metrics", timeout=10) as response:
        text = response.read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{OVERHEAD}_bucket" and sample.labels.get("grpc_method") == "Infer":
                buckets[float(sample.labels["le"])] = sample.value
    return buckets


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """histogram_quantile over the difference of two scrapes, in ms (linear within a bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower * 1000
            inside = count - below
            return (lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)) * 1000
        lower, below = bound, count
    return None
