"""What each part of a call costs inside the sidecar, in µs per call: every stage, finisher,
the call's own bookkeeping and the background batches, timed in the running sidecar under load.

    .venv/bin/python bench/stages.py                      # --features full, 20000 calls, ~40 s
    .venv/bin/python bench/stages.py --features min --requests 40000

Starts the demo backend, what the feature set sends to (bench/run.py's `--features`) and one
`sidecar run` whose process is instrumented before the sidecar is built (`--instrumented`, run
by this script as a child): each pipeline stage and finisher, `begin_call`, `Call.parse`, the
backend attempt's bookkeeping (`Attempt.__enter__`/`__exit__`), the start of the backend call
(`Attempt.unary`, grpc's client call object), reading the usage of the answer, the whole end of
the call (`CallScope._end`, finishers included), and the background batches (the usage file's
writes on its thread, the access log's flush, the trace exporter) are wrapped with a
`perf_counter_ns` pair. h2load drives the calls (closed loop, 4 connections x 8 streams). The sidecar has
one CPU to itself; the backend, h2load and the peers share the other, so no part is timed
across a preemption. At the
end the sidecar writes its totals, and this prints µs per call for each part next to the
process's CPU per call (utime+stime from /proc): the rest is grpc (server and client) and the
event loop, which a bare hop pays too (bench/run.py measures that hop).

Wall-clock time of a part that awaits (a stage whose store answers later) includes the wait:
with the memory store none of the timed parts awaits anything but the backend call, which is
not inside any of them.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOTALS_ENV = "SIDECAR_STAGE_TOTALS"
CLOCK_ENV = "SIDECAR_STAGE_CLOCK"
SCRIPT = Path(__file__).resolve()


# --- inside the instrumented sidecar -----------------------------------------------------------


def instrument(totals_path: str) -> None:
    """Wraps the parts of a call with timers; writes {part: [calls, ns]} at exit."""
    from sidecar import attempt, pipeline, server
    from sidecar.call import Call
    from sidecar.stages import proxy
    from sidecar.telemetry import logging as access_logging
    from sidecar.telemetry import tracing
    from sidecar.usage import sinks

    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    # wall: perf_counter; thread: this thread's CPU time only (a syscall per reading, ~0.3 µs):
    # leaves out time another thread of the process (grpc's poller, the file writer) held the GIL
    clock = time.thread_time_ns if os.environ.get(CLOCK_ENV) == "thread" else time.perf_counter_ns

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        entry = totals[name]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                entry[0] += 1
                entry[1] += clock() - started
        return wrapper

    def timed_async(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        entry = totals[name]

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                entry[0] += 1
                entry[1] += clock() - started
        return wrapper

    original_init = pipeline.Pipeline.__init__

    def pipeline_init(self: pipeline.Pipeline, stages: Any, finishers: Any = ()) -> None:
        def stage(s: Any) -> Any:
            wrapped = timed_async(f"stage {type(s).__name__}", s)
            wrapped.span_name = getattr(s, "span_name", "")  # type: ignore[attr-defined]
            return wrapped

        def finisher(f: Any) -> Any:
            name = getattr(f, "__qualname__", None) or type(f).__name__
            wrapped = timed(f"finisher {name}", f)
            wrapped.__qualname__ = name
            return wrapped
        original_init(self, [stage(s) for s in stages], [finisher(f) for f in finishers])

    pipeline.Pipeline.__init__ = pipeline_init  # type: ignore[method-assign]
    server.begin_call = timed("call: begin_call (metadata, ids)", server.begin_call)
    Call.parse = timed("call: Call.parse (the request)", Call.parse)  # type: ignore[method-assign]
    server.CallScope._end = timed_async("end: CallScope._end (finishers included)",  # type: ignore[method-assign]
                                        server.CallScope._end)
    attempt.Attempt.__enter__ = timed("attempt: enter", attempt.Attempt.__enter__)  # type: ignore[method-assign]
    attempt.Attempt.__exit__ = timed("attempt: exit", attempt.Attempt.__exit__)  # type: ignore[method-assign]
    attempt.Attempt.unary = timed("attempt: unary (grpc client call object)",  # type: ignore[method-assign]
                                  attempt.Attempt.unary)
    proxy._read_usage = timed("proxy: read the answer's usage", proxy._read_usage)
    sinks.FileSink._write = timed("background: usage file write (thread)",  # type: ignore[method-assign]
                                  sinks.FileSink._write)
    access_logging.AccessLog.flush = timed("background: access log flush",  # type: ignore[method-assign]
                                           access_logging.AccessLog.flush)
    tracing.Tracer._request = timed("background: trace export request",  # type: ignore[attr-defined]
                                    tracing.Tracer._request)  # type: ignore[attr-defined]

    def write() -> None:
        Path(totals_path).write_text(json.dumps(dict(totals)))
    atexit.register(write)


def instrumented_main() -> None:
    instrument(os.environ[TOTALS_ENV])
    from sidecar.cli import main
    sys.argv = ["sidecar", *sys.argv[2:]]
    main()


# --- the driver ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    from run import FEATURES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", choices=FEATURES, default="full", help="bench/run.py's feature sets (full)")
    p.add_argument("--requests", type=int, default=20_000, help="h2load requests (20000)")
    p.add_argument("--tokens", type=int, default=8, help="demo backend --tokens (8)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="time parts by the wall clock (default) or by the event loop thread's CPU time "
                        "(leaves out the time other threads held the GIL)")
    return p.parse_args()


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Any]) -> str:
    from latency import Target, request_bytes, unary_batch
    from load import grpc_frame, run_h2load
    from procs import cpu_seconds, loopback, start, stop, wait_serving
    from run import MODEL, Stack, pick_cpus, sidecar_argv, sidecar_config, start_peers

    # the sidecar alone on one CPU, everything else on the other: nothing preempts it in the
    # middle of a timed part, so a part's wall time is its CPU time
    cpus = pick_cpus(None)
    server_cpus = cpus[1] if cpus else None
    stack = Stack(tmp=tmp)
    backend_address = loopback()
    backend = start("backend", sidecar_argv("demo-backend", "--listen", backend_address, "--tokens", str(args.tokens)),
                    tmp, cpus[0] if cpus else None)
    procs.append(backend)
    await wait_serving(backend, backend_address)
    args.cpus = cpus
    peers = start_peers(args, stack)
    procs.extend(stack.procs)
    listen, admin, ops = loopback(), loopback(), loopback()
    config = tmp / "sidecar.yaml"
    import yaml
    config.write_text(yaml.safe_dump(sidecar_config(listen, admin, ops, backend_address, "memory",
                                                    features=args.features, peers=peers)))
    totals = tmp / "totals.json"
    os.environ[TOTALS_ENV] = str(totals)
    os.environ[CLOCK_ENV] = args.clock
    sidecar = start("sidecar", [sys.executable, str(SCRIPT), "--instrumented", "run",
                                "--config", str(config)], tmp, server_cpus)
    procs.append(sidecar)
    await wait_serving(sidecar, listen)
    request = request_bytes(MODEL, args.tokens)
    target = Target("sidecar", listen)
    await target.wait_ok(request)
    await unary_batch(target, request, 300, 8)
    await target.close()
    body = tmp / "request.grpc"
    body.write_bytes(grpc_frame(request))
    # a warm-up run, then the counters start from zero in effect: its numbers are subtracted
    await run_h2load(listen, body, 2000, 4, 8, timeout=120, prefix=["taskset", "-c", cpus[0]] if cpus else [])
    cpu0 = cpu_seconds(sidecar.pid)
    load = await run_h2load(listen, body, args.requests, 4, 8, timeout=600,
                            prefix=["taskset", "-c", cpus[0]] if cpus else [])
    cpu_us = (cpu_seconds(sidecar.pid) - cpu0) / load.requests * 1e6
    stop(sidecar)  # SIGTERM: a clean stop writes the totals
    calls_total = 2000 + args.requests + 300 + 1
    parts = json.loads(totals.read_text())
    return report(parts, cpu_us, load.requests, calls_total, args.features)


def report(parts: dict[str, list[int]], cpu_us: float, requests: int, calls_total: int, features: str) -> str:
    """µs per call of each part (its total over every call the sidecar served)."""
    lines = [f"features {features}: sidecar CPU {cpu_us:.0f} µs per call under load ({requests} calls)", "",
             f"{'part':55} {'µs/call':>8} {'share':>7}"]
    per_call = {name: ns / 1000 / calls_total for name, (_, ns) in parts.items()}
    for name in sorted(per_call, key=lambda n: (n.split(":")[0].split(" ")[0], -per_call[n])):
        lines.append(f"{name:55} {per_call[name]:8.1f} {per_call[name] / cpu_us:7.1%}")
    timed = sum(v for n, v in per_call.items() if not n.startswith(("total", "end")))
    lines += ["", (f"timed parts (without the totals) {timed:.0f} µs of {cpu_us:.0f} µs of process CPU per call: "
                   "the rest is grpc's server and client, the event loop, and what is not timed here")]
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-stages-"))
    procs: list[Any] = []
    from procs import stop
    try:
        print(asyncio.run(measure(args, tmp, procs)))
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--instrumented":
        instrumented_main()
    else:
        sys.exit(main())
