"""Steady load for chaos tests: one thread calling `Infer` back to back, counting outcomes.

Outcomes are counted per `phase` (the test moves it: "before", "outage", "after", ...), as
"OK" or the error's catalog reason, so a test can assert what callers saw in each phase. Every
call carries its own `x-request-id`; the ids of the calls that got an answer are kept per phase
(`answered`), so a test can look for their usage records.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest

INFER = "/inference.v1.Inference/Infer"
INFER_STREAM = "/inference.v1.Inference/InferStream"


@dataclass
class Load:
    target: str
    metadata: tuple[tuple[str, str], ...] = ()
    pause: float = 0.0             # seconds between calls
    stream: bool = False           # InferStream (every chunk read) instead of Infer
    credentials: grpc.ChannelCredentials | None = None  # TLS to the target; None: plaintext
    request: bytes = InferRequest(model="chat", input="hi").SerializeToString()
    phase: str = "before"
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    answered: dict[str, list[str]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Load:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)

    def all_answered(self) -> list[str]:
        return [request_id for ids in self.answered.values() for request_id in ids]

    def total(self) -> Counter[str]:
        return sum(self.outcomes.values(), Counter[str]())

    def _run(self) -> None:
        request = self.request
        channel = (grpc.insecure_channel(self.target) if self.credentials is None
                   else grpc.secure_channel(self.target, self.credentials))
        with channel:
            unary, stream = channel.unary_unary(INFER), channel.unary_stream(INFER_STREAM)
            while not self.stop.is_set():
                phase = self.phase
                request_id = f"load-{uuid.uuid4().hex}"
                metadata = (*self.metadata, ("x-request-id", request_id))
                try:
                    if self.stream:
                        for _ in stream(request, metadata=metadata, timeout=5):
                            pass
                    else:
                        unary(request, metadata=metadata, timeout=5)
                    outcome = "OK"
                    self.answered.setdefault(phase, []).append(request_id)
                except grpc.RpcError as error:
                    outcome = error_detail(error).reason or error.code().name
                self.outcomes.setdefault(phase, Counter())[outcome] += 1
                if self.pause:
                    time.sleep(self.pause)
