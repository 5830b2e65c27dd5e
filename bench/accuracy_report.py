"""The accuracy harness's arithmetic: workers' aggregates -> summary, targets -> checks, text.

The rate window. GCRA admits, from the first decision t0 on, at most B + r*(t - t0) calls by
time t (r per second, B burst), and under continuous excess demand exactly that many, give or
take the one slot in progress. The harness cannot see decision times, only each call's
[sent, recv] interval, which contains its decision. So for the decisions that count, the first
one (t0) and the last admitted one (t_last):

    first_sent <= t0 <= first_recv            (first_recv: the first answer of any kind)
    last_ok_sent <= t_last <= last_ok_recv    (the admitted call that was answered last)

`allowed` = B + r * (last_ok_recv - first_sent) uses the widest window, so it is an upper bound
of what a correct limiter may admit: over-admission against it is never a measurement artefact.
`allowed_min` = B + r * (last_ok_sent - first_recv) uses the narrowest one: a correct limiter
admits at least that (minus the slot in progress). Under-admission is measured against
`allowed` as the target says, so it includes the measurement slack r * (start_slack +
end_slack); the harness keeps both slacks small (callers are released at one instant onto warm
sidecars, and the rate phase ends with a tail of one caller per worker, so the last admitted
answer is not queued behind 64 callers' worth of work), and prints them.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    value: str
    target: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of seconds, in ms."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000, 2)


def _errors(results: list[dict[str, Any]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for result in results:
        total.update(result["errors"])
    return dict(total)


def rate_summary(results: list[dict[str, Any]], rpm: float, burst: int, metrics: dict[str, int]) -> dict[str, Any]:
    per_second = rpm / 60.0
    admitted = sum(r["ok"] for r in results)
    denied = sum(r["denied"] for r in results)
    first_sent = min(r["first_sent"] for r in results)
    first_recv = min(r["first_recv"] for r in results)
    last = max(results, key=lambda r: r["last_ok_recv"])
    window = last["last_ok_recv"] - first_sent if admitted else 0.0
    window_min = max(0.0, last["last_ok_sent"] - first_recv) if admitted else 0.0
    allowed = burst + per_second * window
    allowed_min = burst + per_second * window_min
    ok_latency = [x for r in results for x in r["ok_latency"]]
    denied_latency = [x for r in results for x in r["denied_latency"]]
    over = admitted - allowed
    return {
        "requests_per_minute": rpm, "burst": burst, "admitted": admitted, "denied": denied,
        "errors": _errors(results), "window_s": round(window, 4), "allowed": round(allowed, 2),
        "allowed_min": round(allowed_min, 2),
        "start_slack_ms": round((first_recv - first_sent) * 1000, 2),
        "end_slack_ms": round((last["last_ok_recv"] - last["last_ok_sent"]) * 1000, 2) if admitted else None,
        "over": round(over, 2), "over_pct_of_allowed": round(100 * over / allowed, 3),
        "over_pct_of_limit": round(100 * over / rpm, 3),
        "under": round(-over, 2), "under_pct_of_allowed": round(-100 * over / allowed, 3),
        "calls_per_s": round((admitted + denied) / window, 1) if window else None,
        "ok_latency_ms": {"p50": percentile_ms(ok_latency, 0.5), "p99": percentile_ms(ok_latency, 0.99)},
        "denied_latency_ms": {"p50": percentile_ms(denied_latency, 0.5), "p99": percentile_ms(denied_latency, 0.99)},
        "sidecar_limit_metrics": metrics,
    }


def budget_summary(results: list[dict[str, Any]], budget: int, reservation: int, key: str, counter: int | None,
                   metrics: dict[str, int]) -> dict[str, Any]:
    consumed = sum(r["input_tokens"] + r["output_tokens"] for r in results)
    return {
        "tokens_per_day": budget, "reservation": reservation,
        "admitted": sum(r["ok"] for r in results), "denied": sum(r["denied"] for r in results),
        "errors": _errors(results), "gave_up": sum(r["gave_up"] for r in results),
        "consumed": consumed, "input_tokens": sum(r["input_tokens"] for r in results),
        "output_tokens": sum(r["output_tokens"] for r in results),
        "max_call_tokens": max(r["max_call_tokens"] for r in results),
        "overshoot": consumed - budget, "overshoot_reservations": round((consumed - budget) / reservation, 3),
        "unused": budget - consumed, "unused_reservations": round((budget - consumed) / reservation, 3),
        "store_key": key, "store_counter": counter,
        # what the store still holds beyond the reported usage: reservations never settled
        "store_minus_consumed": None if counter is None else counter - consumed,
        "seconds": round(max(r["last_recv"] for r in results) - min(r["first_sent"] for r in results), 3),
        "sidecar_limit_metrics": metrics,
    }


def checks(summary: dict[str, Any], args: argparse.Namespace) -> list[Check]:
    rate, budget = summary["rate"], summary["budget"]
    allowed, admitted = rate["allowed"], rate["admitted"]
    reservation = budget["reservation"]
    return [
        Check("rate: no unexpected errors", not rate["errors"], str(rate["errors"] or "none"), "none"),
        Check("rate: demand exceeded the limit", rate["denied"] > 0, f"{rate['denied']} denied", "> 0 denied"),
        Check("rate: over-admission", admitted - allowed <= args.max_over_pct / 100 * allowed,
              f"{rate['over_pct_of_allowed']:+.2f} % of allowed", f"<= {args.max_over_pct} %"),
        Check("rate: under-admission", admitted >= (1 - args.max_under_pct / 100) * allowed,
              f"{rate['under_pct_of_allowed']:+.2f} % of allowed", f"<= {args.max_under_pct} %"),
        Check("budget: no unexpected errors", not budget["errors"], str(budget["errors"] or "none"), "none"),
        Check("budget: exhausted (every caller ended on BUDGET_EXCEEDED)", budget["gave_up"] == 0 and
              budget["denied"] > 0, f"{budget['gave_up']} callers gave up", "0"),
        Check("budget: overshoot", budget["overshoot"] <= args.max_overshoot * reservation,
              f"{budget['overshoot']:+d} tokens ({budget['overshoot_reservations']:+.2f} reservations)",
              f"<= {args.max_overshoot:g} x {reservation}"),
        Check("budget: left unused", budget["unused"] <= args.max_unused * reservation,
              f"{budget['unused']} tokens ({budget['unused_reservations']:.2f} reservations)",
              f"<= {args.max_unused:g} x {reservation}"),
        Check("budget: counter found in the store", budget["store_counter"] is not None,
              str(budget["store_counter"]), "present"),
    ]


def render(summary: dict[str, Any], results: list[Check]) -> str:
    s, r, b = summary["settings"], summary["rate"], summary["budget"]
    lines = [
        (f"accuracy: {s['sidecars']} sidecars, {s['callers']} callers in {s['workers']} processes, "
        f"{s['backends']} backend(s), redis: {s['redis']}; {summary['seconds']} s"),
        *([("  slots        " + ", ".join(f"{org} on {node}" for org, node in s["org_nodes"].items()))]
          if s.get("org_nodes") else []),
        "",
        (f"rate phase: requests_per_minute {r['requests_per_minute']:g}, burst {r['burst']}, "
        f"{s['seconds']:g} s + {s['tail_seconds']:g} s tail"),
        (f"  calls        {r['admitted'] + r['denied']} ({r['calls_per_s']} /s): {r['admitted']} admitted, "
        f"{r['denied']} denied (RATE_LIMIT_EXCEEDED), errors: {r['errors'] or 'none'}"),
        (f"  window       {r['window_s']:.4f} s = first call sent -> last admitted answer received "
        f"(start slack {r['start_slack_ms']} ms, end slack {r['end_slack_ms']} ms)"),
        (f"  allowed      {r['allowed']:.2f} = B + R/60 x window (a correct limiter admits "
        f"{r['allowed_min']:.2f} .. {r['allowed']:.2f})"),
        (f"  admitted     {r['admitted']}: over {r['over']:+.2f} = {r['over_pct_of_allowed']:+.3f} % of allowed, "
        f"{r['over_pct_of_limit']:+.3f} % of the per-minute limit; under {r['under_pct_of_allowed']:+.3f} %"),
        (f"  latency ms   admitted p50 {r['ok_latency_ms']['p50']} p99 {r['ok_latency_ms']['p99']}; "
        f"denied p50 {r['denied_latency_ms']['p50']} p99 {r['denied_latency_ms']['p99']}"),
        f"  sidecars     {r['sidecar_limit_metrics'] or 'no degraded decisions, no store errors'}",
        "",
        f"budget phase: tokens_per_day {b['tokens_per_day']}, one call reserves {b['reservation']} tokens",
        (f"  calls        {b['admitted']} admitted, {b['denied']} denied (BUDGET_EXCEEDED), "
        f"errors: {b['errors'] or 'none'}, {b['seconds']} s"),
        (f"  consumed     {b['consumed']} = {b['input_tokens']} input + {b['output_tokens']} output tokens "
        f"reported by the backend (max {b['max_call_tokens']} per call)"),
        (f"  overshoot    {b['overshoot']:+d} tokens = {b['overshoot_reservations']:+.3f} reservations; "
        f"left unused {b['unused']}"),
        (f"  store        {b['store_key']} = {b['store_counter']} "
        f"(store - consumed = {b['store_minus_consumed']})"),
        f"  sidecars     {b['sidecar_limit_metrics'] or 'no degraded decisions, no store errors'}",
        "",
    ]
    for check in results:
        lines.append(f"  [{'ok' if check.ok else 'MISSED'}] {check.name}: {check.value} (target {check.target})")
    lines.append("PASSED: every target met" if all(c.ok for c in results) else "FAILED: a target was missed")
    return "\n".join(lines)
