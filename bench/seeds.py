"""The seeds' load scenarios (issue 20): baseline 100 calls/s and peak 1,000 calls/s sustained, a
burst of 2,000 calls/s for 30 s, each against the backend itself, a bare hop and the full-featured
sidecar, interleaved in one run and measured from outside with h2load. A mode of bench/loadtest.py:

    .venv/bin/python bench/loadtest.py --seeds                  # 60 s + 60 s + 30 s per target
    .venv/bin/python bench/loadtest.py --seeds --seed-scenarios peak --seed-sustained-seconds 20

Per scenario every target gets the same open-loop load in turn (the order rotates per scenario):
`direct` (the demo backend), `reference+rid` (bench/reference_proxy.py --request-id, the cheapest
hop the contract allows, on the event loop the sidecar loaded) and `sidecar` (`sidecar run` with
bench/run.py's `--features full` config). rate x seconds calls at the rate, from single-connection
h2load processes (one per 100 calls/s, started 1/rate apart so that their calls interleave; see
`generators()`), pinned to one CPU; the servers share the other. Measured per run:

- as the caller sees it, from h2load's per-request log: achieved rate, errors, latency p50/p95/p99,
  and the latency added over `direct` at the same rate;
- errors h2load cannot see (gRPC errors are HTTP 200 with a grpc-status trailer): answers without
  their DATA frame, and the sidecar's own `grpc_server_handled_total` by code;
- the sidecar's own view of its share, `api_router_sidecar_overhead_seconds`, before and after;
- CPU: utime+stime of every process (/proc/PID/stat; h2load's from getrusage) and each CPU's busy
  share (/proc/stat), so that a scenario this machine cannot hold names the resource that ran out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any, Self

import grpc
import yaml
from counts import delta, overhead_buckets, quantile, scrape_handled
from latency import API_KEY, INFER, METADATA, Target, request_bytes, rotated
from load import grpc_frame, h2load_path, process_output, run_h2load
from procs import cancel_on_sigterm, cpu_seconds, loaded_event_loop, loopback, start, wait_serving
from run import (
    FEATURES,
    MODEL,
    Stack,
    close_stack,
    pick_cpus,
    run_on_stack,
    sidecar_argv,
    sidecar_config,
    start_peers,
    start_reference,
)

TARGETS = ("direct", "reference", "reference+rid", "sidecar")
TOKENS = 8                 # demo backend --tokens, as bench/run.py
HELD_SHARE = 0.95          # a rate is held when at least this share of it was achieved
SATURATED = 0.90           # a CPU this busy over a run has run out
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
# "latency growing without bound": the median latency of the last fifth of a run's calls is more
# than GROWTH x that of the first fifth and at least GROWTH_MS higher (a queue built up during the run)
GROWTH, GROWTH_MS = 2.0, 5.0
# who runs where: the servers' CPU or the load generators' (run.py's pinning)
SERVERS = ("backend", "sidecar", "reference", "reference+rid", "valkey")
LABELS = {"sidecar": "the sidecar", "backend": "the backend", "h2load": "h2load", "runner": "this runner",
          "otlp-sink": "the OTLP sink", "tansu": "the Kafka broker", "valkey": "Valkey"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("the seeds' load scenarios (--seeds; see bench/README.md)")
    g.add_argument("--seeds", action="store_true",
                   help="run the seed scenarios (baseline, peak, burst) with h2load against direct, "
                        "reference+rid and the sidecar instead of the scenarios above")
    g.add_argument("--seed-scenarios", default="baseline,peak,burst", help="which, comma-separated")
    g.add_argument("--seed-baseline-rate", type=float, default=100.0, help="calls/s (100)")
    g.add_argument("--seed-peak-rate", type=float, default=1000.0, help="calls/s (1000)")
    g.add_argument("--seed-burst-rate", type=float, default=2000.0, help="calls/s (2000)")
    g.add_argument("--seed-sustained-seconds", type=float, default=60.0, help="baseline and peak (60)")
    g.add_argument("--seed-burst-seconds", type=float, default=30.0, help="burst (30)")
    g.add_argument("--seed-targets", default="direct,reference+rid,sidecar",
                   help=f"comma-separated, of {', '.join(TARGETS)}; direct is always measured")
    g.add_argument("--seed-features", choices=FEATURES, default="full", help="bench/run.py's feature sets (full)")
    g.add_argument("--seed-rate-per-connection", type=float, default=100.0,
                   help="calls/s per h2load process (one connection each); one process per this many (100: "
                        "h2load's --rps timer ticks every 10 ms, faster per connection sends clumps)")
    g.add_argument("--seed-in-flight", type=int, default=256,
                   help="calls in flight at most, all h2load processes together (256)")
    g.add_argument("--seed-idle-seconds", type=float, default=2.0,
                   help="quiet time before each run: queues drain, the burst lands on an idle stack (2)")
    g.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                   help="h2load and this runner on one CPU, the servers on another (default: on with 2+ CPUs)")


@dataclass(frozen=True)
class Scenario:
    name: str
    rate: float     # calls per second offered
    seconds: float  # for how long


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    known = {"baseline": Scenario("baseline", args.seed_baseline_rate, args.seed_sustained_seconds),
             "peak": Scenario("peak", args.seed_peak_rate, args.seed_sustained_seconds),
             "burst": Scenario("burst", args.seed_burst_rate, args.seed_burst_seconds)}
    names = [n for n in args.seed_scenarios.split(",") if n]
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"--seed-scenarios: unknown {sorted(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


@dataclass(frozen=True)
class Generators:
    """How one run's open loop is spread over h2load processes of one connection each."""

    calls: list[int]   # per process
    rate_each: float   # calls/s per process (its --rps)
    streams: int       # its -m: calls in flight at most
    stagger: float     # seconds between the starts of two processes

    @property
    def in_flight_cap(self) -> int:
        return len(self.calls) * self.streams


def generators(rate: float, seconds: float, rate_per_connection: float, in_flight: int) -> Generators:
    """rate x seconds calls at `rate`. h2load's --rps starts a connection's calls from a timer that
    ticks every 10 ms at most, so above 100 calls/s per connection they leave in clumps; and the
    connections of one h2load fall into step (most likely: its one event loop re-arms every timer
    due in an iteration from the same cached time). Hence one single-connection h2load per
    `rate_per_connection` calls/s, each started 1/rate after the previous: their calls interleave
    evenly (`clumped` in the report says how evenly)."""
    n = max(1, math.ceil(rate / rate_per_connection))
    total = max(n, round(rate * seconds))  # h2load wants -n >= -c
    calls = [total // n + (1 if i < total % n else 0) for i in range(n)]
    return Generators(calls, rate / n, max(1, math.ceil(in_flight / n)), 1 / rate)


# --------------------------------------------------------------------------- CPU, measured


def cpu_jiffies() -> dict[str, tuple[int, int]]:
    """(busy, total) clock ticks of each CPU since boot, from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            total = sum(ticks)
            out[name.removeprefix("cpu")] = (total - ticks[3] - ticks[4], total)
    return out


@dataclass
class Sample:
    at: float
    processes: dict[str, float]           # name -> utime+stime seconds
    cpus: dict[str, tuple[int, int]]      # CPU -> (busy, total) ticks


class Sampler:
    """CPU time of the named processes and each CPU's ticks, once per `interval`, in a thread: the
    event loop and h2load must not wait for it. The first and last samples bound the run."""

    def __init__(self, pids: dict[str, int], interval: float = 1.0) -> None:
        # cpu_seconds(pid) includes a process's descendants: right for the servers, wrong for this
        # runner (its children are the servers), whose own CPU getrusage gives
        self.readers: dict[str, Callable[[], float]] = {n: partial(cpu_seconds, p) for n, p in pids.items()}
        self.readers["runner"] = own_cpu_seconds
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        self.samples.append(Sample(time.monotonic(), {n: read() for n, read in self.readers.items()},
                                   cpu_jiffies()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def usage(self) -> tuple[dict[str, float], dict[str, float], list[dict[str, float]]]:
        """(busy share of each CPU, share of one CPU each process used) over the whole run, and the
        busy share of each CPU per interval."""
        first, last = self.samples[0], self.samples[-1]
        seconds = max(last.at - first.at, 1e-9)
        processes = {n: (last.processes[n] - first.processes[n]) / seconds for n in self.readers}
        series = [_busy(a.cpus, b.cpus) for a, b in pairwise(self.samples)]
        return _busy(first.cpus, last.cpus), processes, series


def _busy(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    return {cpu: round((after[cpu][0] - b[0]) / max(1, after[cpu][1] - b[1]), 3) for cpu, b in before.items()}


def own_cpu_seconds() -> float:
    """utime + stime of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """utime + stime of the waited-for children (h2load's, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- which resource ran out


@dataclass
class Flow:
    """What the caller side saw of one run."""

    rate: float                  # offered, calls/s
    achieved: float              # answered calls/s
    sent: float                  # calls/s h2load managed to start (less than `rate`: its queue grew)
    error_rate: float
    first_p50_ms: float | None   # median latency of the first fifth of the calls
    last_p50_ms: float | None    # ... and of the last fifth
    max_in_flight: int
    in_flight_cap: int           # h2load's -m, all processes together


@dataclass
class Usage:
    """CPU over one run: each CPU's busy share, each process's share of one CPU, where it is pinned."""

    busy: dict[str, float]
    processes: dict[str, float]
    placement: dict[str, str] = field(default_factory=dict)  # process -> CPU; empty when unpinned


@dataclass
class Diagnosis:
    held: bool
    problems: list[str]    # why not held (empty when held)
    exhausted: list[str]   # what ran out, e.g. "server CPU 1", "h2load's in-flight cap"
    cause: str             # what ran out, with the numbers ("" when held)
    sentence: str          # held or not, why, and the cause


def diagnose(flow: Flow, usage: Usage, slo_error_rate: float) -> Diagnosis:
    """Held or not, and if not, which measured resource ran out, as a sentence with the numbers."""
    problems = []
    if flow.achieved < HELD_SHARE * flow.rate:
        text = f"achieved {flow.achieved:.0f} of {flow.rate:.0f} calls/s ({flow.achieved / flow.rate:.0%})"
        if flow.sent < HELD_SHARE * flow.rate:
            text += f", h2load could start only {flow.sent:.0f}/s"
        if flow.max_in_flight >= flow.in_flight_cap:
            text += f" with all {flow.in_flight_cap} calls it may have in flight taken"
        problems.append(text)
    if flow.error_rate > slo_error_rate:
        problems.append(f"error rate {flow.error_rate:.4f} > {slo_error_rate}")
    if (flow.first_p50_ms is not None and flow.last_p50_ms is not None
            and flow.last_p50_ms > GROWTH * flow.first_p50_ms and flow.last_p50_ms - flow.first_p50_ms > GROWTH_MS):
        problems.append(f"latency grew: p50 {flow.first_p50_ms:.1f} ms in the first fifth of the calls, "
                        f"{flow.last_p50_ms:.1f} ms in the last")
    if not problems:
        cpus = "; ".join(_cpu_story(cpu, usage) for cpu in sorted(usage.busy))
        return Diagnosis(True, [], [], "", f"held: {flow.achieved:.0f} of {flow.rate:.0f} calls/s, error rate "
                                           f"{flow.error_rate:.4f}; {cpus}")
    exhausted, stories = [], []
    if usage.placement:
        for cpu in sorted(usage.busy):
            if usage.busy[cpu] >= SATURATED:
                role = _role(cpu, usage)
                exhausted.append(f"{role} CPU {cpu}")
                stories.append(f"{role} CPU {cpu} saturated ({usage.busy[cpu]:.0%} busy): "
                               + _uses(_shares(cpu, usage), f"of CPU {cpu}"))
                if role == "load generator":
                    stories.append("the load generator, not the target, was the limit")
    elif usage.busy and sum(usage.busy.values()) / len(usage.busy) >= SATURATED:
        mean = sum(usage.busy.values()) / len(usage.busy)
        exhausted.append("all CPUs")
        stories.append(f"all {len(usage.busy)} CPUs saturated ({mean:.0%} busy on average): "
                       + _uses(usage.processes, "of one CPU"))
    if not exhausted:
        busy = ", ".join(f"CPU {c} {b:.0%}" for c, b in sorted(usage.busy.items()))
        if flow.max_in_flight >= flow.in_flight_cap:
            exhausted.append("h2load's in-flight cap")
            stories.append(f"no CPU ran out ({busy} busy), but all {flow.in_flight_cap} calls h2load may have "
                           "in flight were taken: the target answered too slowly for the rate while waiting, "
                           "not computing (the backend, a lock, a queue)")
        else:
            stories.append(f"no measured resource ran out ({busy} busy, at most {flow.max_in_flight} of "
                           f"{flow.in_flight_cap} calls in flight)")
    cause = "; ".join(stories)
    return Diagnosis(False, problems, exhausted, cause, f"not held ({'; '.join(problems)}): {cause}")


def _role(cpu: str, usage: Usage) -> str:
    on_it = [p for p, c in usage.placement.items() if c == cpu]
    return "server" if any(p in SERVERS for p in on_it) else "load generator" if on_it else "unused"


def _cpu_story(cpu: str, usage: Usage) -> str:
    """'server CPU 1 40% busy: the sidecar used 28%, the backend 11% of it'."""
    role = f"{_role(cpu, usage)} " if usage.placement else ""
    shares = _shares(cpu, usage)
    return f"{role}CPU {cpu} {usage.busy[cpu]:.0%} busy" + (f": {_uses(shares, 'of it')}" if shares else "")


def _shares(cpu: str, usage: Usage) -> dict[str, float]:
    """Each of our processes' share of `cpu`, and what other processes took of it."""
    shares = {p: s for p, s in usage.processes.items() if usage.placement.get(p) == cpu}
    other = usage.busy[cpu] - sum(shares.values())
    if shares and other >= 0.05:  # below: the clock-tick rounding of our own processes
        shares["other processes"] = other
    return shares


def _uses(shares: dict[str, float], of: str) -> str:
    """'the sidecar used 71%, the backend 26% of it' (largest first, below 1 % left out)."""
    parts = [(LABELS.get(p, p), s) for p, s in sorted(shares.items(), key=lambda i: -i[1]) if s >= 0.01]
    if not parts:
        return "none of our processes used 1 %"
    (first, share), rest = parts[0], parts[1:]
    return f"{first} used {share:.0%}" + "".join(f", {name} {s:.0%}" for name, s in rest) + f" {of}"


# --------------------------------------------------------------------------- one h2load run


@dataclass
class CallerView:
    """From h2load's --log-file: one line per call, `start µs since epoch <TAB> HTTP status <TAB> µs to
    the end of the response` (status -1: the stream failed)."""

    calls: int
    answered: int                   # HTTP 200
    achieved: float                 # answered / (last end - first start)
    sent: float                     # calls started per second
    clumped: float                  # share of calls started within a tenth of 1/rate after the previous
    latency_ms: dict[str, float | None]
    first_p50_ms: float | None
    last_p50_ms: float | None
    max_in_flight: int
    per_second: list[dict[str, Any]]


def read_log(path: Path) -> list[tuple[int, int, int]]:
    """(start µs, status, µs to the end) per call, in start order (h2load writes them as they end)."""
    rows = []
    for line in path.read_text().splitlines():
        start_us, status, took_us = line.split("\t")[:3]
        rows.append((int(start_us), int(status), int(took_us)))
    rows.sort()
    return rows


def caller_view(rows: list[tuple[int, int, int]], rate: float) -> CallerView:
    """What the calls of `read_log()` (in start order), offered at `rate`, saw."""
    ok = [r for r in rows if r[1] == 200]
    if not rows:
        return CallerView(0, 0, 0.0, 0.0, 0.0, dict.fromkeys(QUANTILES), None, None, 0, [])
    close = 0.1 * 1e6 / rate
    clumped = sum(b[0] - a[0] < close for a, b in pairwise(rows)) / max(1, len(rows) - 1)
    first, last_start = rows[0][0], rows[-1][0]
    last_end = max(s + d for s, _, d in rows)
    fifth = max(1, len(ok) // 5)
    events = sorted([(s, 1) for s, _, _ in rows] + [(s + d, -1) for s, _, d in rows], key=lambda e: (e[0], e[1]))
    in_flight = max_in_flight = 0
    for _, step in events:
        in_flight += step
        max_in_flight = max(max_in_flight, in_flight)
    seconds: dict[int, list[int]] = {}
    for s, status, d in rows:
        seconds.setdefault((s - first) // 1_000_000, []).append(d if status == 200 else -1)
    per_second = [{"second": k, "started": len(v),
                   "p50_ms": _pct([x / 1000 for x in v if x >= 0], 0.5)} for k, v in sorted(seconds.items())]
    return CallerView(
        calls=len(rows), answered=len(ok),
        achieved=len(ok) / max((last_end - first) / 1e6, 1e-6),
        sent=(len(rows) - 1) / ((last_start - first) / 1e6) if last_start > first else 0.0,
        clumped=round(clumped, 3),
        latency_ms={q: _pct([d / 1000 for _, _, d in ok], v) for q, v in QUANTILES.items()},
        first_p50_ms=_pct([d / 1000 for _, _, d in ok[:fifth]], 0.5),
        last_p50_ms=_pct([d / 1000 for _, _, d in ok[-fifth:]], 0.5),
        max_in_flight=max_in_flight, per_second=per_second)


def _pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))], 3)


H2LOAD_COUNTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout")
H2LOAD_DATA = re.compile(r"\((\d+)\) data")


@dataclass
class Context:
    """What every run needs: the stack, the request, where to pin, the options."""

    args: argparse.Namespace
    stack: Stack
    body: Path
    frame_len: dict[str, int]       # target -> bytes of one answer's gRPC frame
    ops: str | None                 # the sidecar's ops listener
    pids: dict[str, int]            # the processes started, whose CPU is sampled (and this runner's)
    placement: dict[str, str]       # process -> CPU it is pinned to
    load_cpu: str | None


async def measure(ctx: Context, target: Target, scenario: Scenario) -> dict[str, Any]:
    """One open-loop run of `scenario` against `target`, with everything measured around it."""
    args = ctx.args
    ops = ctx.ops if target.name == "sidecar" else None
    hist0 = await asyncio.to_thread(overhead_buckets, ops) if ops else None
    handled0 = await asyncio.to_thread(scrape_handled, ops) if ops else None
    plan = generators(scenario.rate, scenario.seconds, args.seed_rate_per_connection, args.seed_in_flight)
    logs = [ctx.stack.tmp / f"{scenario.name}-{target.name}-{i}.h2load.log" for i in range(len(plan.calls))]
    h2load_cpu0 = children_cpu_seconds()
    started = time.monotonic()
    with Sampler(ctx.pids) as sampler:
        tasks = []
        async with asyncio.TaskGroup() as group:  # one failing h2load cancels (kills) the others
            for i, (calls, log) in enumerate(zip(plan.calls, logs, strict=True)):
                await asyncio.sleep(max(0.0, started + i * plan.stagger - time.monotonic()))
                tasks.append(group.create_task(process_output(h2load_argv(ctx, target, plan, calls, log),
                                                       timeout=scenario.seconds * 5 + 60)))
    wall = time.monotonic() - started
    h2load_cpu = children_cpu_seconds() - h2load_cpu0
    ctx.stack.proxy[target.name].check_alive()
    hist1 = await asyncio.to_thread(overhead_buckets, ops) if ops else None
    handled = delta(handled0, await asyncio.to_thread(scrape_handled, ops)) if ops else None

    view = caller_view(sorted(row for log in logs for row in read_log(log)), scenario.rate)
    done, succeeded, failed, data = (sum(c) for c in zip(*(h2load_counts(t.result()) for t in tasks), strict=True))
    calls = sum(plan.calls)
    # gRPC errors are HTTP 200 with a grpc-status trailer and no DATA frame: count the answers
    # missing theirs, and for the sidecar what it counted itself; calls never done are errors too.
    missing = max(0, succeeded - data // ctx.frame_len[target.name])
    sidecar_errors = sum(n for code, n in handled.items() if code != "OK") if handled else 0
    errors = (calls - done) + failed + max(missing, sidecar_errors)
    busy, processes, series = sampler.usage()
    processes["h2load"] = h2load_cpu / wall
    usage = Usage(busy, {n: round(s, 3) for n, s in processes.items()}, ctx.placement)
    flow = Flow(scenario.rate, view.achieved, view.sent, errors / calls, view.first_p50_ms, view.last_p50_ms,
                view.max_in_flight, plan.in_flight_cap)
    diagnosis = diagnose(flow, usage, args.slo_error_rate)
    histogram = ({q: _round(quantile(v, hist0, hist1)) for q, v in QUANTILES.items()}
                 if hist0 is not None and hist1 is not None else None)
    return {"target": target.name, "calls": calls, "answered": view.answered, "seconds": round(wall, 2),
            "achieved_rate": round(view.achieved, 1), "sent_rate": round(view.sent, 1),
            "generators": {"h2load_processes": len(plan.calls), "rate_each": plan.rate_each,
                           "in_flight_cap": plan.in_flight_cap, "clumped_share": view.clumped},
            "errors": errors, "error_rate": round(errors / calls, 5),
            "error_sources": {"h2load_failed": failed, "not_done": calls - done, "answers_without_data": missing,
                              "sidecar_handled": handled},
            "latency_ms": view.latency_ms, "first_p50_ms": view.first_p50_ms, "last_p50_ms": view.last_p50_ms,
            "max_in_flight": view.max_in_flight, "overhead_histogram_ms": histogram,
            "cpu_busy": busy, "cpu_busy_per_interval": series, "process_cpu": usage.processes,
            "held": diagnosis.held, "problems": diagnosis.problems, "exhausted": diagnosis.exhausted,
            "cause": diagnosis.cause, "resources": diagnosis.sentence, "per_second": view.per_second}


def h2load_argv(ctx: Context, target: Target, plan: Generators, calls: int, log: Path) -> list[str]:
    """One h2load process: one connection, `calls` calls at plan.rate_each, pinned to the load CPU."""
    return [*(["taskset", "-c", ctx.load_cpu] if ctx.load_cpu else []), "h2load", "-n", str(calls), "-c", "1",
            "-m", str(plan.streams), "--rps", f"{plan.rate_each:.6g}", "-t", "1", "-d", str(ctx.body),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", f"authorization: Bearer {API_KEY}", "-N", "30s", "--log-file", str(log),
            f"http://{target.address}{INFER}"]


def h2load_counts(out: str) -> tuple[int, int, int, int]:
    """(done, succeeded, failed, response DATA bytes) from h2load's summary."""
    counts, data = H2LOAD_COUNTS.search(out), H2LOAD_DATA.search(out)
    if not (counts and data):
        raise RuntimeError(f"cannot parse h2load's output:\n{out}")
    return int(counts[3]), int(counts[4]), int(counts[5]), int(data[1])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --------------------------------------------------------------------------- a scenario, judged


def judge(scenario: Scenario, runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Added latency over direct, sidecar-added / reference-added, and the SLO verdict (the sidecar's run)."""
    slo = {"p50": args.slo_overhead_p50_ms, "p95": args.slo_overhead_p95_ms, "p99": args.slo_overhead_p99_ms}
    direct = runs["direct"]["latency_ms"]
    added: dict[str, dict[str, float | None]] = {}
    for name, run in runs.items():
        if name != "direct":
            added[name] = {q: _minus(run["latency_ms"][q], direct[q]) for q in QUANTILES}
    # sidecar-added / reference-added compares two hops' costs: only while both kept up with the
    # rate (past that, both latencies are queueing in front of a saturated CPU)
    ratios = {ref: ({q: _ratio(added["sidecar"][q], added[ref][q]) for q in QUANTILES}
                    if runs["sidecar"]["held"] and runs[ref]["held"] else None)
              for ref in ("reference+rid", "reference") if ref in added and "sidecar" in added}
    result: dict[str, Any] = {**asdict(scenario), "added_ms": added, "ratios": ratios, "passed": None,
                              "misses": [], "runs": runs}
    sidecar = runs.get("sidecar")
    if sidecar is None:
        return result
    misses = list(sidecar["problems"])
    if sidecar["error_rate"] > args.slo_error_rate and not any(p.startswith("error rate") for p in misses):
        misses.append(f"error rate {sidecar['error_rate']} > {args.slo_error_rate}")
    for q, limit in slo.items():
        caller = added["sidecar"][q]
        if caller is None or caller > limit:
            misses.append(f"added {q} {caller} ms > {limit} (caller side)")
        own = (sidecar["overhead_histogram_ms"] or {}).get(q)
        if own is None or own > limit:
            misses.append(f"overhead histogram {q} {own} ms > {limit}")
    if not runs["direct"]["held"]:
        misses.append("the backend alone did not hold the rate either: added latency is against an "
                      "overloaded direct run")
    result["passed"] = not misses
    result["misses"] = misses
    return result


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else round(a / b, 2)


# --------------------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    env = report["environment"]
    pinned = (f"h2load, this runner and the feature set's peers on CPU {env['pinned']['load_generators']}, "
              f"the servers on CPU {env['pinned']['servers']}" if env["pinned"] else "nothing pinned")
    setup = (f"Targets: {', '.join(s['targets'])}; the sidecar with `--features {s['features']}`, loops "
             f"{report['loops']}. Load: open loop, rate x seconds calls per run from one single-connection h2load "
             f"per {s['rate_per_connection']:g} calls/s, started 1/rate apart so that their calls interleave "
             f"(`clumped`: the share of calls started within a tenth of 1/rate after the previous one), at most "
             f"{s['in_flight']} calls in flight in all; every target gets the same load in turn, the order rotated "
             f"per scenario. {pinned}. Load average at start / end: {env['loadavg_start']} / {env['loadavg_end']} "
             "(other work on the machine).")
    slos = (f"SLOs: error rate <= {s['slo']['error_rate']}; overhead p50 <= {s['slo']['p50']} ms, p95 <= "
            f"{s['slo']['p95']} ms, p99 <= {s['slo']['p99']} ms, both as the caller sees it (sidecar - direct at "
            f"the same rate) and in the sidecar's own histogram; held = at least {HELD_SHARE:.0%} of the rate "
            "answered, without latency growing run-long.")
    lines = [f"# Seed load scenarios ({env['time']})", "", setup, "", slos, "",
             "| scenario | load | result | what ran out (sidecar run) | detail |", "|---|---|---|---|---|"]
    for sc in report["scenarios"]:
        verdict = "-" if sc["passed"] is None else "pass" if sc["passed"] else "**FAIL**"
        detail = "; ".join(sc["misses"]) or "within the SLOs"
        cause = sc["runs"].get("sidecar", {}).get("cause") or "-"
        lines.append(f"| {sc['name']} | {sc['rate']:g} calls/s for {sc['seconds']:g} s | {verdict} | {cause} | "
                     f"{detail} |")
    for sc in report["scenarios"]:
        lines += ["", f"## {sc['name']}: {sc['rate']:g} calls/s for {sc['seconds']:g} s", "",
                  ("| target | calls | h2load, clumped | achieved calls/s | error rate | latency p50 / p95 / p99 ms | "
                   "added p50 / p95 / p99 ms | overhead histogram p50 / p95 / p99 ms | held |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, run in sc["runs"].items():
            added = sc["added_ms"].get(name)
            hist = run["overhead_histogram_ms"]
            gen = run["generators"]
            lines.append(f"| {name} | {run['calls']} | {gen['h2load_processes']} x {gen['rate_each']:g}/s, "
                         f"{gen['clumped_share']:.0%} | {run['achieved_rate']} | {run['error_rate']} | "
                         f"{_triple(run['latency_ms'])} | {_triple(added) if added else '-'} | "
                         f"{_triple(hist) if hist else '-'} | {'yes' if run['held'] else '**no**'} |")
        for ref, ratio in sc["ratios"].items():
            lines.append("")
            lines.append(f"sidecar-added / {ref}-added: " + (", ".join(
                f"{q} {'n/a' if v is None else f'{v:.2f}x'}" for q, v in ratio.items()) if ratio else
                "not compared: one of the two runs did not keep up with the rate"))
        lines += ["", "Resources:", ""]
        lines += [f"- {name}: {run['resources']}" for name, run in sc["runs"].items()]
    return "\n".join(lines) + "\n"


def _triple(values: dict[str, float | None]) -> str:
    return " / ".join("-" if values.get(q) is None else f"{values[q]:.2f}" for q in QUANTILES)


# --------------------------------------------------------------------------- the stack and the run


async def start_targets(args: argparse.Namespace, stack: Stack, wanted: list[str], request: bytes) -> str | None:
    """The demo backend, the sidecar (with what its feature set sends to) and the reference proxies
    asked for, on the servers' CPU; returns the sidecar's ops address."""
    server_cpu = args.cpus[1] if args.cpus else None
    backend_addr = loopback()
    backend = stack.add(start("backend", sidecar_argv("demo-backend", "--listen", backend_addr, "--tokens",
                                                      str(TOKENS)), stack.tmp, server_cpu))
    stack.backend = backend
    await wait_serving(backend, backend_addr)
    stack.targets.append(Target("direct", backend_addr))
    stack.proxy["direct"] = backend
    stack.loops["direct"] = loaded_event_loop(backend.pid)
    sidecar, ops = None, None
    if "sidecar" in wanted:
        listen, admin, ops = loopback(), loopback(), loopback()
        peers = start_peers(argparse.Namespace(features=args.seed_features, cpus=args.cpus), stack)
        config = stack.tmp / "sidecar.yaml"
        config.write_text(yaml.safe_dump(sidecar_config(listen, admin, ops, backend_addr, "memory", None,
                                                        args.seed_features, peers), sort_keys=False))
        proc = stack.add(start("sidecar", sidecar_argv("run", "--config", str(config)), stack.tmp, server_cpu))
        await wait_serving(proc, listen)
        sidecar = Target("sidecar", listen)
        stack.proxy["sidecar"] = proc
        stack.loops["sidecar"] = loaded_event_loop(proc.pid)
    loop = stack.loops.get("sidecar", "asyncio")  # the bare hop runs on the loop the sidecar loaded
    for name in ("reference", "reference+rid"):
        if name in wanted:
            await start_reference(stack, name, loop, backend_addr, server_cpu,
                                  *(["--request-id"] if name == "reference+rid" else []))
    if sidecar:
        stack.targets.append(sidecar)
    for target in stack.targets:
        await target.wait_ok(request)
    return ops


async def run_seeds(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    cancel_on_sigterm()
    try:
        return await _run_seeds(args, stack)
    finally:
        await close_stack(stack)


async def _run_seeds(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    wanted = [t for t in args.seed_targets.split(",") if t]
    if set(wanted) - set(TARGETS):
        raise SystemExit(f"--seed-targets: unknown {sorted(set(wanted) - set(TARGETS))}; known: {TARGETS}")
    request = request_bytes(MODEL, TOKENS)
    loadavg_start = loadavg()
    print("starting the backend, the sidecar, the reference proxy ...", file=sys.stderr)
    ops = await start_targets(args, stack, wanted, request)
    body = stack.tmp / "infer_request.grpc"
    body.write_bytes(grpc_frame(request))
    frame_len = {t.name: len(await t.infer(request, metadata=METADATA)) + 5 for t in stack.targets}
    load_cpu = args.cpus[0] if args.cpus else None
    pids = {p.name: p.pid for p in stack.procs}
    placement = ({n: (args.cpus[1] if n in SERVERS else args.cpus[0]) for n in [*pids, "runner", "h2load"]}
                 if args.cpus else {})
    ctx = Context(args, stack, body, frame_len, ops, pids, placement, load_cpu)
    for target in stack.targets:  # warm-up, not counted: connections, caches, the sidecar's first calls
        await run_h2load(target.address, body, 1000, 4, 8, 60, prefix=["taskset", "-c", load_cpu] if load_cpu else [])
    results = []
    for i, scenario in enumerate(scenarios(args)):
        runs: dict[str, dict[str, Any]] = {}
        for target in rotated(stack.targets, i):
            await asyncio.sleep(args.seed_idle_seconds)
            print(f"  {scenario.name}: {scenario.rate:g} calls/s for {scenario.seconds:g} s -> {target.name}",
                  file=sys.stderr)
            runs[target.name] = await measure(ctx, target, scenario)
            print(f"    {runs[target.name]['resources']}", file=sys.stderr)
        ordered = {t.name: runs[t.name] for t in stack.targets}  # report in a fixed order
        results.append(judge(scenario, ordered, args))
    return {"settings": settings(args, wanted), "environment": environment(args, loadavg_start),
            "loops": stack.loops, "scenarios": results}


def settings(args: argparse.Namespace, wanted: list[str]) -> dict[str, Any]:
    return {"targets": ["direct", *[t for t in wanted if t != "direct"]], "features": args.seed_features,
            "rate_per_connection": args.seed_rate_per_connection, "in_flight": args.seed_in_flight,
            "idle_seconds": args.seed_idle_seconds, "tokens": TOKENS,
            "slo": {"error_rate": args.slo_error_rate, "p50": args.slo_overhead_p50_ms,
                    "p95": args.slo_overhead_p95_ms, "p99": args.slo_overhead_p99_ms},
            "held_share": HELD_SHARE, "saturated_busy": SATURATED}


def environment(args: argparse.Namespace, loadavg_start: str) -> dict[str, Any]:
    version = subprocess.run(["h2load", "--version"], check=False, capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__,
            "h2load": version, "machine": platform.platform(),
            "pinned": {"load_generators": args.cpus[0], "servers": args.cpus[1]} if args.cpus else None,
            "loadavg_start": loadavg_start, "loadavg_end": loadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def loadavg() -> str:
    """1, 5 and 15 minute load averages: how much else ran on the machine."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(args: argparse.Namespace, output: Path) -> int:
    """Runs the seed scenarios; writes the report to `output` (.md) and a .json beside it; 1 = an SLO missed."""
    if not h2load_path():
        raise SystemExit("--seeds needs h2load: apt-get install -y nghttp2-client")
    args.cpus = pick_cpus(args.pin)
    report = run_on_stack(args, "sidecar-seeds-", lambda stack: run_seeds(args, stack))
    if report is None:
        return 130
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(report))
    output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    for sc in report["scenarios"]:
        verdict = "-" if sc["passed"] is None else "pass" if sc["passed"] else "FAIL"
        print(f"{sc['name']:10} {verdict:5} {'; '.join(sc['misses']) or 'within the SLOs'}")
    print(f"report: {output}")
    return 1 if any(sc["passed"] is False for sc in report["scenarios"]) else 0
