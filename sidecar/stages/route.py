"""Route: resolve the model, and (after admission) pick its backend.

`ResolveModel` runs right after authentication: limits and budgets need the model's settings,
and an unknown model must not cost the caller a rate-limit slot. A model is served over one protocol
(`models.<m>.protocol`); a call through the other one fails FAILED_PRECONDITION /
PROTOCOL_MISMATCH here, before it costs anything. `PickBackend` runs last, so a
refused call never takes a backend; proxy only ever talks to the backend chosen here.
"""
from __future__ import annotations

from collections.abc import Callable

from sidecar.call import Call
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.routing.router import Router


class ResolveModel:
    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config

    async def __call__(self, call: Call) -> None:
        name = call.request.model
        model = self._config().models.get(name)
        if model is None:
            raise SidecarError("NOT_FOUND", f"unknown model {name!r}", metadata={"model": name})
        if model.protocol != call.protocol:
            raise protocol_mismatch(name, model.protocol, call.protocol)
        call.model = model


def protocol_mismatch(model: str, served: str, called: str) -> SidecarError:
    """A model is called through one protocol only: its backends speak the other one, and
    forwarding would only get an UNIMPLEMENTED from them (or worse, a misread request)."""
    how = {"inference_v1": "inference.v1.Inference (Infer, InferStream)",
           "oip": "the Open Inference Protocol (inference.GRPCInferenceService/ModelInfer)"}
    return SidecarError("PROTOCOL_MISMATCH", f"model {model!r} is served over {how[served]}; call it that way",
                        metadata={"model": model, "protocol": served, "called_with": called})


class PickBackend:
    span_name = "sidecar.route"

    def __init__(self, router: Router) -> None:
        self._router = router

    async def __call__(self, call: Call) -> None:
        self._router.pick(call)
