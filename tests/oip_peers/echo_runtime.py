"""An MLServer custom runtime that answers every input with itself: FP32, BYTES, any datatype.

Loaded by `mlserver start` (its own virtualenv, see scripts/oip_peers.sh) from a model directory
whose model-settings.json names `echo_runtime.EchoModel`. Each output has the input's name,
shape, datatype and data, so a caller can check that a tensor crossed every hop unchanged.
An input named `fail` makes the call fail (MLServer answers it with an error status).
"""
from __future__ import annotations

from mlserver import MLModel
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class EchoModel(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if any(request_input.name == "fail" for request_input in payload.inputs):
            raise MLServerError("echo asked to fail", status_code=400)
        outputs = [ResponseOutput(name=request_input.name, shape=request_input.shape,
                                  datatype=request_input.datatype, data=request_input.data)
                   for request_input in payload.inputs]
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=outputs)
