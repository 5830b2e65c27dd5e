"""Load test: scenarios against a sidecar, each judged against the SLOs, with a report.

    .venv/bin/python bench/loadtest.py                          # a local stack, ~2 min
    .venv/bin/python bench/loadtest.py --duration 5             # shorter scenarios
    .venv/bin/python bench/loadtest.py --target HOST:PORT --ops HOST:PORT --api-key KEY \\
        [--rate-limited-key KEY] [--budget-key KEY] [--backend-failure-command CMD]
    .venv/bin/python bench/loadtest.py --seeds                  # the seeds' scenarios: bench/seeds.py

Without `--target` it starts its own stack: two demo backends and `sidecar run` with a config
that has a main org (no limits), an org limited to 600 requests/minute and an org with a small
daily token budget. With `--target` it runs against a deployed sidecar (e.g. through `kubectl
port-forward`); scenarios whose inputs are not given are reported as skipped, never as passed.

Scenarios (open loop: calls start at the rate whatever the answers take, up to `--max-in-flight`):

| scenario | load | passes when |
|---|---|---|
| baseline | `--rate` calls/s | error rate and sidecar overhead (p50, p95) within the SLOs |
| peak | `--peak-rate` calls/s | the same |
| burst | idle, then `--burst-concurrency` callers back to back | the same |
| backend_failure | `--rate`; a third in, one backend is killed (`--backend-failure-command` remotely) | the same: retries on the other backend hide it |
| rate_limit | 1.5 x what the limited org may send in the time (its burst + its rate) | only RATE_LIMIT_EXCEEDED denials, some, and nothing admitted beyond burst + rate x time (+5 %) |
| budget | calls of the budget org until refused | only BUDGET_EXCEEDED denials, tokens charged at most the budget + one call |

The sidecar's own share of a call comes from its `api_router_sidecar_overhead_seconds` histogram
(scraped from `--ops` before and after each scenario), the error rate from the answers. The
report (Markdown and JSON) goes to `--output` (default bench/results/loadtest-<time>.md); the
exit code is 1 when an SLO was missed.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import seeds
import yaml
from counts import overhead_buckets, quantile
from procs import Proc, loopback, start, stop, wait_serving
from sidecar_client import error_detail
from sidecar_client.inference.v1 import inference_pb2

INFER = "/inference.v1.Inference/Infer"
MODEL = "chat"
KEYS = {"main": "load-main-key", "limited": "load-limited-key", "budget": "load-budget-key"}
LIMITED_RPM = 600
BUDGET_TOKENS = 20_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=15.0, help="seconds per scenario (15)")
    p.add_argument("--rate", type=float, default=150.0, help="baseline calls per second (150)")
    p.add_argument("--peak-rate", type=float, default=400.0, help="peak calls per second (400)")
    p.add_argument("--burst-concurrency", type=int, default=64, help="callers at once in the burst (64)")
    p.add_argument("--max-in-flight", type=int, default=256, help="calls in flight at most, open loop (256)")
    p.add_argument("--slo-overhead-p50-ms", type=float, default=2.0, help="sidecar overhead median (2 ms)")
    p.add_argument("--slo-overhead-p95-ms", type=float, default=10.0, help="sidecar overhead p95 (10 ms)")
    p.add_argument("--slo-overhead-p99-ms", type=float, default=20.0,
                   help="sidecar overhead p99 (20 ms; judged in the --seeds scenarios)")
    p.add_argument("--slo-error-rate", type=float, default=0.001, help="failed share of calls (0.001)")
    p.add_argument("--scenarios", default="baseline,peak,burst,backend_failure,rate_limit,budget")
    p.add_argument("--output", type=Path, default=None, help="report path (.md; a .json beside it)")
    remote = p.add_argument_group("against a deployed sidecar")
    remote.add_argument("--target", help="the sidecar's inference listener, HOST:PORT")
    remote.add_argument("--ops", help="its ops listener (for /metrics), HOST:PORT")
    remote.add_argument("--api-key", help="a key of an org the limits do not bind")
    remote.add_argument("--model", default=MODEL)
    remote.add_argument("--rate-limited-key", help="a key of an org with a requests_per_minute limit")
    remote.add_argument("--rate-limit-rpm", type=float, default=LIMITED_RPM, help="that org's requests_per_minute")
    remote.add_argument("--budget-key", help="a key of an org with a small daily token budget")
    remote.add_argument("--budget-tokens", type=int, default=BUDGET_TOKENS, help="that budget, in tokens")
    remote.add_argument("--backend-failure-command", help="a shell command that takes one backend down")
    seeds.add_arguments(p)
    return p.parse_args(argv)


# --- the load ----------------------------------------------------------------------------------

@dataclass
class Outcomes:
    latencies_ms: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)  # "OK" or "CODE/REASON"
    output_tokens: int = 0
    input_tokens: int = 0

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    def failed(self, expected: tuple[str, ...] = ()) -> int:
        return sum(n for code, n in self.codes.items() if code != "OK" and code.split("/")[-1] not in expected)


class Caller:
    def __init__(self, target: str, model: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.infer = self.channel.unary_unary(INFER)
        self.request = inference_pb2.InferRequest(model=model, input="a load test call",
                                                  max_output_tokens=8).SerializeToString()

    async def one(self, key: str, outcomes: Outcomes) -> None:
        started = time.perf_counter()
        try:
            raw = await self.infer(self.request, timeout=30.0, metadata=(("x-api-key", key),))
        except grpc.aio.AioRpcError as error:
            outcomes.codes[f"{error.code().name}/{error_detail(error).reason}"] += 1
            return
        finally:
            outcomes.latencies_ms.append((time.perf_counter() - started) * 1000)
        response = inference_pb2.InferResponse.FromString(raw)
        outcomes.codes["OK"] += 1
        outcomes.input_tokens += response.usage.input_tokens
        outcomes.output_tokens += response.usage.output_tokens

    async def open_loop(self, key: str, rate: float, seconds: float, max_in_flight: int,
                        outcomes: Outcomes, at: list[tuple[float, Any]] | None = None) -> None:
        """Starts calls at `rate` per second for `seconds`; `at` = [(second, coroutine fn)] started on
        the way (as tasks: the load goes on while they run)."""
        slots = asyncio.Semaphore(max_in_flight)
        tasks: set[asyncio.Task[None]] = set()
        events = []
        started = time.perf_counter()
        pending = sorted(at or [], key=lambda e: e[0])
        n = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            while pending and pending[0][0] <= elapsed:
                events.append(asyncio.create_task(pending.pop(0)[1]()))
            due = started + n / rate
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            await slots.acquire()
            task = asyncio.create_task(self.one(key, outcomes))
            task.add_done_callback(lambda t: (slots.release(), tasks.discard(t)))
            tasks.add(task)
            n += 1
        await asyncio.gather(*tasks, *events)

    async def closed_loop(self, key: str, concurrency: int, seconds: float, outcomes: Outcomes) -> None:
        end = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < end:
                await self.one(key, outcomes)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def close(self) -> None:
        await self.channel.close()


# --- scenarios ----------------------------------------------------------------------------------

@dataclass
class Result:
    scenario: str
    passed: bool | None  # None: skipped
    detail: str
    calls: int = 0
    rps: float = 0.0
    error_rate: float = 0.0
    overhead_p50_ms: float | None = None
    overhead_p95_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    codes: dict[str, int] = field(default_factory=dict)


class Run:
    def __init__(self, args: argparse.Namespace, target: str, ops: str, keys: dict[str, str | None],
                 fail_backend: Any) -> None:
        self.args = args
        self.caller = Caller(target, args.model)
        self.ops = ops
        self.keys = keys
        self.fail_backend = fail_backend

    async def slo_scenario(self, name: str, load: Any) -> Result:
        """Runs `load(outcomes)` and judges error rate and overhead against the SLOs."""
        key = self.keys["main"]
        assert key is not None
        before = overhead_buckets(self.ops)
        outcomes = Outcomes()
        started = time.perf_counter()
        await load(key, outcomes)
        seconds = time.perf_counter() - started
        after = overhead_buckets(self.ops)
        result = self._measured(name, outcomes, seconds, before, after)
        misses = []
        if result.error_rate > self.args.slo_error_rate:
            misses.append(f"error rate {result.error_rate:.4f} > {self.args.slo_error_rate}")
        if result.overhead_p50_ms is None or result.overhead_p50_ms > self.args.slo_overhead_p50_ms:
            misses.append(f"overhead p50 {result.overhead_p50_ms} ms > {self.args.slo_overhead_p50_ms}")
        if result.overhead_p95_ms is None or result.overhead_p95_ms > self.args.slo_overhead_p95_ms:
            misses.append(f"overhead p95 {result.overhead_p95_ms} ms > {self.args.slo_overhead_p95_ms}")
        result.passed = not misses
        result.detail = "; ".join(misses) or "within the SLOs"
        return result

    def _measured(self, name: str, outcomes: Outcomes, seconds: float, before: dict[float, float],
                  after: dict[float, float], expected: tuple[str, ...] = ()) -> Result:
        latencies = sorted(outcomes.latencies_ms)
        return Result(
            name, None, "", outcomes.calls, round(outcomes.calls / seconds, 1),
            round(outcomes.failed(expected) / max(1, outcomes.calls), 5),
            _round(quantile(0.5, before, after)), _round(quantile(0.95, before, after)),
            _round(latencies[len(latencies) // 2] if latencies else None),
            _round(latencies[int(len(latencies) * 0.95)] if latencies else None), dict(outcomes.codes))

    async def baseline(self) -> Result:
        return await self.slo_scenario("baseline", lambda key, out: self.caller.open_loop(
            key, self.args.rate, self.args.duration, self.args.max_in_flight, out))

    async def peak(self) -> Result:
        return await self.slo_scenario("peak", lambda key, out: self.caller.open_loop(
            key, self.args.peak_rate, self.args.duration, self.args.max_in_flight, out))

    async def burst(self) -> Result:
        await asyncio.sleep(2)  # idle first: the burst arrives on a quiet sidecar
        return await self.slo_scenario("burst", lambda key, out: self.caller.closed_loop(
            key, self.args.burst_concurrency, self.args.duration / 3, out))

    async def backend_failure(self) -> Result:
        if self.fail_backend is None:
            return Result("backend_failure", None, "skipped: give --backend-failure-command to take a backend down")
        return await self.slo_scenario("backend_failure", lambda key, out: self.caller.open_loop(
            key, self.args.rate, self.args.duration, self.args.max_in_flight, out,
            at=[(self.args.duration / 3, self.fail_backend)]))

    async def rate_limit(self) -> Result:
        key = self.keys["limited"]
        if key is None:
            return Result("rate_limit", None, "skipped: give --rate-limited-key (and --rate-limit-rpm)")
        # the limit admits a burst of a minute's amount, then its rate: send half as much again
        rate = self.args.rate_limit_rpm / 60.0
        offered = (self.args.rate_limit_rpm + rate * self.args.duration) * 1.5 / self.args.duration
        outcomes = Outcomes()
        started = time.perf_counter()
        await self.caller.open_loop(key, offered, self.args.duration, self.args.max_in_flight, outcomes)
        seconds = time.perf_counter() - started
        result = self._measured("rate_limit", outcomes, seconds, {}, {}, expected=("RATE_LIMIT_EXCEEDED",))
        allowed = (self.args.rate_limit_rpm + rate * seconds) * 1.05
        denied = outcomes.codes.get("RESOURCE_EXHAUSTED/RATE_LIMIT_EXCEEDED", 0)
        problems = []
        if outcomes.failed(("RATE_LIMIT_EXCEEDED",)):
            problems.append(f"calls failed otherwise: {dict(outcomes.codes)}")
        if outcomes.codes["OK"] > allowed:
            problems.append(f"{outcomes.codes['OK']} admitted, more than burst + rate x time = {allowed:.0f}")
        if not denied:
            problems.append(f"nothing was denied of {outcomes.calls} calls, {offered:.0f}/s offered")
        result.passed = not problems
        result.detail = "; ".join(problems) or f"{outcomes.codes['OK']} admitted (at most {allowed:.0f}), {denied} denied"
        return result

    async def budget(self) -> Result:
        key = self.keys["budget"]
        if key is None:
            return Result("budget", None, "skipped: give --budget-key (and --budget-tokens)")
        outcomes = Outcomes()
        started = time.perf_counter()
        deadline = started + max(self.args.duration, 10)
        while time.perf_counter() < deadline and not outcomes.codes.get("RESOURCE_EXHAUSTED/BUDGET_EXCEEDED"):
            await asyncio.gather(*(self.caller.one(key, outcomes) for _ in range(16)))
        seconds = time.perf_counter() - started
        result = self._measured("budget", outcomes, seconds, {}, {}, expected=("BUDGET_EXCEEDED",))
        charged = outcomes.input_tokens + outcomes.output_tokens
        per_call = charged / max(1, outcomes.codes["OK"])
        problems = []
        if outcomes.failed(("BUDGET_EXCEEDED",)):
            problems.append(f"calls failed otherwise: {dict(outcomes.codes)}")
        if not outcomes.codes.get("RESOURCE_EXHAUSTED/BUDGET_EXCEEDED"):
            problems.append(f"no call was refused within {seconds:.0f} s")
        if charged > self.args.budget_tokens + 16 * per_call:  # calls in flight when it ran out
            problems.append(f"{charged} tokens served, more than the budget {self.args.budget_tokens}")
        result.passed = not problems
        result.detail = "; ".join(problems) or (f"{charged} tokens served of a {self.args.budget_tokens}-token "
                                               f"budget, then BUDGET_EXCEEDED")
        return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --- the local stack ----------------------------------------------------------------------------

def local_config(listen: str, ops: str, backends: list[str]) -> dict[str, Any]:
    digests = {org: hashlib.sha256(key.encode()).hexdigest() for org, key in KEYS.items()}
    return {
        "listen": listen, "admin_listen": loopback(), "ops_listen": ops,
        "health_checks": {"interval_ms": 500, "timeout_ms": 250, "unhealthy_threshold": 2, "healthy_threshold": 1},
        "auth": {"api_keys": [{"id": f"{org}-key", "sha256": digest, "org": org} for org, digest in digests.items()]},
        "limits": {"orgs": {"limited": {"requests_per_minute": LIMITED_RPM}}},
        "budgets": {"orgs": {"budget": {"tokens_per_day": BUDGET_TOKENS}}},
        "models": {MODEL: {"timeout_ms": 10000, "backends": [
            {"name": f"b{i}", "address": address} for i, address in enumerate(backends)]}},
    }


async def local_stack(tmp: Path, procs: list[Proc]) -> tuple[str, str, Any]:
    addresses = [loopback(), loopback()]
    backends = [start(f"backend-{i}", [sys.executable, "-m", "sidecar", "demo-backend", "--listen", a], tmp)
                for i, a in enumerate(addresses)]
    procs.extend(backends)
    for proc, address in zip(backends, addresses, strict=True):
        await wait_serving(proc, address)
    listen, ops = loopback(), loopback()
    path = tmp / "sidecar.yaml"
    path.write_text(yaml.safe_dump(local_config(listen, ops, addresses)))
    sidecar = start("sidecar", [sys.executable, "-m", "sidecar", "run", "--config", str(path)], tmp)
    procs.append(sidecar)
    await wait_serving(sidecar, listen)

    async def kill_a_backend() -> None:
        stop(backends[1], timeout=0)  # SIGTERM then SIGKILL at once: a crash, in-flight calls included
    return listen, ops, kill_a_backend


# --- report -------------------------------------------------------------------------------------

def render(results: list[Result], args: argparse.Namespace, where: str) -> str:
    lines = [f"# Load test report ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})", "",
             (f"Target: {where}. SLOs: sidecar overhead p50 <= {args.slo_overhead_p50_ms} ms, p95 <= "
              f"{args.slo_overhead_p95_ms} ms; error rate <= {args.slo_error_rate}."), "",
             "| scenario | result | calls | calls/s | error rate | overhead p50 / p95 ms | latency p50 / p95 ms | detail |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = "skipped" if r.passed is None else ("pass" if r.passed else "**FAIL**")
        lines.append(f"| {r.scenario} | {verdict} | {r.calls} | {r.rps} | {r.error_rate} | "
                     f"{r.overhead_p50_ms} / {r.overhead_p95_ms} | {r.latency_p50_ms} / {r.latency_p95_ms} | "
                     f"{r.detail} |")
    lines += ["", "Answers per scenario: " + "; ".join(f"{r.scenario}: {r.codes}" for r in results if r.codes)]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> list[Result]:
    if args.target:
        if not (args.ops and args.api_key):
            raise SystemExit("--target needs --ops and --api-key")
        command = args.backend_failure_command

        async def run_command() -> None:
            proc = await asyncio.create_subprocess_exec(*shlex.split(command))
            if await asyncio.wait_for(proc.wait(), 120) != 0:
                raise RuntimeError(f"--backend-failure-command exited with {proc.returncode}")
        target, ops = args.target, args.ops
        keys: dict[str, str | None] = {"main": args.api_key, "limited": args.rate_limited_key,
                                       "budget": args.budget_key}
        fail = run_command if command else None
    else:
        target, ops, fail = await local_stack(tmp, procs)
        keys = dict(KEYS)
    run = Run(args, target, ops, keys, fail)
    try:
        await run.caller.one(keys["main"] or "", Outcomes())  # a first call: channel and sidecar warm
        results = []
        for name in args.scenarios.split(","):
            result = await getattr(run, name)()
            print(f"{name:16} {'skipped' if result.passed is None else 'pass' if result.passed else 'FAIL':8} "
                  f"{result.detail}", flush=True)
            results.append(result)
        return results
    finally:
        await run.caller.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seeds:
        if args.target:
            raise SystemExit("--seeds starts its own stack (direct, reference+rid, sidecar): drop --target")
        return seeds.main(args, args.output or Path(__file__).parent / "results" /
                          f"seeds-{time.strftime('%Y%m%d-%H%M%S')}.md")
    output: Path = args.output or Path(__file__).parent / "results" / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}.md"
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-loadtest-"))
    procs: list[Proc] = []
    try:
        results = asyncio.run(main_async(args, tmp, procs))
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(results, args, args.target or "a local stack (bench/loadtest.py)"))
    output.with_suffix(".json").write_text(json.dumps({
        "slo": {"overhead_p50_ms": args.slo_overhead_p50_ms, "overhead_p95_ms": args.slo_overhead_p95_ms,
                "error_rate": args.slo_error_rate},
        "scenarios": [asdict(r) for r in results]}, indent=2))
    print(f"report: {output}")
    misses = [r.scenario for r in results if r.passed is False]
    if misses:
        print(f"SLO missed: {', '.join(misses)}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
