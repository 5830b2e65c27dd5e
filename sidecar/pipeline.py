"""The order of the stages a call passes before it is proxied, written in one place.

Each stage is an `async def __call__(call)` that fills in the `Call` or raises a `SidecarError`.
The proxy itself (unary or stream) runs after the last stage, in `server.py`.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from sidecar.call import Call
from sidecar.config import Config
from sidecar.limits.memory_store import MemoryLimitStore
from sidecar.routing.balancer import Balancer
from sidecar.stages.auth import Authenticate
from sidecar.stages.limits import RateLimit
from sidecar.stages.route import Route

Stage = Callable[[Call], Awaitable[None]]


class Pipeline:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)

    async def admit(self, call: Call) -> None:
        for stage in self.stages:
            await stage(call)

    def __repr__(self) -> str:
        return f"<Pipeline {' -> '.join(type(s).__name__ for s in self.stages)}>"


def build_pipeline(config: Callable[[], Config], balancer: Balancer, limit_store: MemoryLimitStore) -> Pipeline:
    return Pipeline([
        # 1. authenticate first: nothing else runs, and nothing is spent, for an unknown caller.
        Authenticate(config),
        # 2. rate limits need the org and key id; a throttled call must not reach routing.
        RateLimit(config, limit_store),
        # 3. route last: resolving the model and taking a backend is only worth it for a call
        # that every earlier stage admitted.
        Route(config, balancer),
    ])
