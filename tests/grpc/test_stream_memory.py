"""A long stream is relayed chunk by chunk: the sidecar's memory stays bounded (measured)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from sidecar_client.inference.v1.inference_pb2 import InferChunk, InferRequest

from tests.conftest import Launcher
from tests.grpc.test_proxy import INFER_STREAM
from tests.harness.sidecar import one_model

CHUNKS = 1000
CHUNK_BYTES = 128 * 1024  # 128 MiB in all: far more than the bound asserted below


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.01)


def test_thousand_chunk_stream_keeps_sidecar_memory_bounded(launch: Launcher) -> None:
    backend = launch.backend("--tokens", str(CHUNKS), "--chunk-bytes", str(CHUNK_BYTES))
    sidecar = launch.sidecar(one_model(backend.address))
    request = InferRequest(model="chat", input="").SerializeToString()
    with grpc.insecure_channel(sidecar.listen) as channel:
        stream = channel.unary_stream(INFER_STREAM)
        warm = sum(1 for _ in stream(InferRequest(model="chat", max_output_tokens=20).SerializeToString()))
        assert warm == 20
        baseline = rss_bytes(sidecar.proc.pid)
        sampler = RssSampler(sidecar.proc.pid)
        sampler.start()
        received = total = 0
        for raw in stream(request, timeout=120):
            chunk = InferChunk.FromString(raw)
            received += 1
            total += len(chunk.delta_bytes)
            if received % 10 == 0:
                time.sleep(0.002)  # a slower reader than the backend: flow control must push back
        sampler.done.set()
        sampler.join()
    assert received == CHUNKS and total == CHUNKS * CHUNK_BYTES
    growth = sampler.peak - baseline
    print(f"\nstream of {total / 2**20:.0f} MiB: sidecar RSS baseline {baseline / 2**20:.1f} MiB, "
          f"peak {sampler.peak / 2**20:.1f} MiB, growth {growth / 2**20:.1f} MiB")
    assert growth < 32 * 2**20, f"sidecar RSS grew by {growth / 2**20:.1f} MiB relaying a stream"
