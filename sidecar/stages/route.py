"""Route: resolve the model and pick its backend.

Runs after admission (auth, limits, budget) so a refused call never takes a backend slot, and
before proxy, which only ever talks to the backend chosen here.
"""
from __future__ import annotations

from collections.abc import Callable

from sidecar.call import Call
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.routing.balancer import Balancer


class Route:
    def __init__(self, config: Callable[[], Config], balancer: Balancer) -> None:
        self._config = config
        self._balancer = balancer

    async def __call__(self, call: Call) -> None:
        name = call.request.model
        model = self._config().models.get(name)
        if model is None:
            raise SidecarError("NOT_FOUND", f"unknown model {name!r}", metadata={"model": name})
        call.model = model
        backend = self._balancer.pick(name)
        if backend is None:
            raise SidecarError("NO_BACKEND_AVAILABLE", f"no backend of model {name!r} can take the call",
                               metadata={"model": name})
        call.backend = backend
