"""What OIP `ModelInfer` pass-through costs next to `Infer`: sidecar CPU per call, and memory per
call with a 1 MiB tensor.

    .venv/bin/python bench/oip_cost.py                 # ~1 min on 2 cores
    .venv/bin/python bench/oip_cost.py --rounds 6 --calls 3000

Starts an `inference.v1` demo backend, an OIP demo backend (`--protocol oip`) and one sidecar of
the work tree serving both (`bench`: inference_v1, `bench-oip`: oip; an API key, a memory request
rate limit too large to deny, a cost budget with prices, usage records off), then calls it in
interleaved rounds from one grpc.aio client (raw bytes, `--concurrency` calls in flight):

1. small: `Infer{model, input: "hello world", max_output_tokens: 8}` vs `ModelInfer` with one
   FP32 [1, 3] tensor: the sidecar's CPU per call (utime + stime over the round / calls);
2. 1 MiB: `Infer{input_bytes: 1 MiB}` (echoed back in `output_bytes`) vs `ModelInfer` with a
   1 MiB `raw_input_contents` (echoed in `raw_output_contents`): CPU per call, and the sidecar's
   memory: RSS growth over the rounds (a leak would show) and the peak RSS (VmHWM) above the
   idle baseline, per call in flight.
Printed: medians over rounds, and the ratio OIP / Infer.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from procs import Proc, cpu_seconds, loopback, start, stop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))
from sidecar_client.inference import grpc_service_pb2 as oip
from sidecar_client.inference.v1.inference_pb2 import InferRequest

KEY = "sk-bench-oip"
MIB = 1024 * 1024
INFER = "/inference.v1.Inference/Infer"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def requests() -> dict[str, tuple[str, bytes]]:
    small = oip.ModelInferRequest(model_name="bench-oip")
    small.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1.0, 2.0, 3.0])
    payload = os.urandom(MIB)
    large = oip.ModelInferRequest(model_name="bench-oip", raw_input_contents=[payload])
    large.inputs.add(name="RAW", datatype="UINT8", shape=[MIB])
    return {
        "infer-small": (INFER, InferRequest(model="bench", input="hello world", max_output_tokens=8).SerializeToString()),
        "oip-small": (MODEL_INFER, small.SerializeToString()),
        "infer-1mib": (INFER, InferRequest(model="bench", input_bytes=payload, max_output_tokens=8).SerializeToString()),
        "oip-1mib": (MODEL_INFER, large.SerializeToString()),
    }


def config(listen: str, v1: str, oip_backend: str) -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return f"""listen: {listen}
admin_listen: {loopback()}
ops_listen: {loopback()}
auth:
  api_keys: [{{id: bench, sha256: "{digest}", org: bench}}]
limits:
  orgs: {{bench: {{requests_per_minute: 100000000}}}}
budgets:
  orgs: {{bench: {{cost_per_day: 100000000}}}}
  prices:
    bench: {{input_per_1k: 0.001, output_per_1k: 0.001, per_request: 0.0001}}
    bench-oip: {{per_request: 0.0001}}
models:
  bench:
    backends: [{{name: a, address: "{v1}"}}]
  bench-oip:
    protocol: oip
    backends: [{{name: a, address: "{oip_backend}"}}]
telemetry: {{access_log: false}}
"""


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of pid, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def run_calls(channel: grpc.aio.Channel, method: str, raw: bytes, calls: int, concurrency: int) -> None:
    call = channel.unary_unary(method)
    metadata = (("x-api-key", KEY),)
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            await call(raw, metadata=metadata, timeout=30)
    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def wait_ready(target: str, raw: bytes, proc: Proc) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        for _ in range(200):
            proc.check_alive()
            try:
                await channel.unary_unary(INFER)(raw, metadata=(("x-api-key", KEY),), timeout=2)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    raise RuntimeError("the sidecar did not answer")


async def measure(args: argparse.Namespace, tmp: Path, procs: list[Proc]) -> None:
    v1, oip_addr, listen = loopback(), loopback(), loopback()
    demo = [sys.executable, "-m", "sidecar", "demo-backend"]
    procs.append(start("backend-v1", [*demo, "--listen", v1, "--tokens", "8"], tmp))
    procs.append(start("backend-oip", [*demo, "--listen", oip_addr, "--protocol", "oip"], tmp))
    path = tmp / "sidecar.yaml"
    path.write_text(config(listen, v1, oip_addr))
    sidecar = start("sidecar", [sys.executable, "-m", "sidecar", "run", "--config", str(path)], tmp)
    procs.append(sidecar)
    bodies = requests()
    await wait_ready(listen, bodies["infer-small"][1], sidecar)
    options = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]
    cpu: dict[str, list[float]] = {name: [] for name in bodies}
    async with grpc.aio.insecure_channel(listen, options=options) as channel:
        for method, raw in bodies.values():  # warm up every path
            await run_calls(channel, method, raw, 50, args.concurrency)
        baseline_rss, _ = memory_kib(sidecar.pid)
        for round_ in range(args.rounds):
            order = list(bodies)[round_ % 4:] + list(bodies)[:round_ % 4]
            for name in order:
                method, raw = bodies[name]
                calls = args.calls if name.endswith("small") else args.large_calls
                started = cpu_seconds(sidecar.pid)
                await run_calls(channel, method, raw, calls, args.concurrency)
                cpu[name].append((cpu_seconds(sidecar.pid) - started) / calls * 1e6)
        rss_after, hwm = memory_kib(sidecar.pid)
    print(f"sidecar CPU per call (median of {args.rounds} rounds, concurrency {args.concurrency}):")
    for size in ("small", "1mib"):
        infer, model_infer = statistics.median(cpu[f"infer-{size}"]), statistics.median(cpu[f"oip-{size}"])
        print(f"  {size:6s} Infer {infer:7.0f} µs   ModelInfer {model_infer:7.0f} µs   ModelInfer/Infer "
              f"{model_infer / infer:.3f}")
    print(f"sidecar RSS: idle after warm-up {baseline_rss / 1024:.1f} MiB, after all rounds "
          f"{rss_after / 1024:.1f} MiB (growth {(rss_after - baseline_rss) / 1024:+.1f} MiB over "
          f"{args.rounds * 2 * args.large_calls} 1 MiB calls); peak (VmHWM) {hwm / 1024:.1f} MiB = "
          f"{(hwm - baseline_rss) / 1024 / args.concurrency:.2f} MiB above idle per call in flight")
    await asyncio.sleep(0)


async def memory_only(args: argparse.Namespace, tmp: Path, procs: list[Proc], name: str) -> float:
    """Peak RSS above idle per call in flight, for one kind of 1 MiB call alone in a fresh sidecar."""
    v1, oip_addr, listen = loopback(), loopback(), loopback()
    demo = [sys.executable, "-m", "sidecar", "demo-backend"]
    procs.append(start(f"backend-v1-{name}", [*demo, "--listen", v1, "--tokens", "8"], tmp))
    procs.append(start(f"backend-oip-{name}", [*demo, "--listen", oip_addr, "--protocol", "oip"], tmp))
    path = tmp / f"sidecar-{name}.yaml"
    path.write_text(config(listen, v1, oip_addr))
    sidecar = start(f"sidecar-{name}", [sys.executable, "-m", "sidecar", "run", "--config", str(path)], tmp)
    procs.append(sidecar)
    bodies = requests()
    await wait_ready(listen, bodies["infer-small"][1], sidecar)
    options = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]
    async with grpc.aio.insecure_channel(listen, options=options) as channel:
        method, raw = bodies[name]
        await run_calls(channel, method, bodies[name.replace("1mib", "small")][1], 20, args.concurrency)
        idle, _ = memory_kib(sidecar.pid)
        await run_calls(channel, method, raw, args.large_calls * 2, args.concurrency)
        _, hwm = memory_kib(sidecar.pid)
    for proc in procs[-3:]:
        stop(proc)
    return (hwm - idle) / 1024 / args.concurrency


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000, help="small calls per target per round")
    p.add_argument("--large-calls", type=int, default=200, help="1 MiB calls per target per round")
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    procs: list[Proc] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="oip-cost-") as tmp:
        try:
            asyncio.run(measure(args, Path(tmp), procs))
            for proc in procs:
                stop(proc)
            peaks = {name: asyncio.run(memory_only(args, Path(tmp), procs, name)) for name in ("infer-1mib", "oip-1mib")}
            print("peak RSS above idle per 1 MiB call in flight, each alone in a fresh sidecar: "
                  + ", ".join(f"{name} {value:.2f} MiB" for name, value in peaks.items()))
        finally:
            for proc in procs:
                stop(proc)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
