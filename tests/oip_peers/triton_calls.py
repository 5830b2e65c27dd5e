"""Make KServe v2 calls with the real `tritonclient[grpc]` and print what happened, as JSON.

Run by the tritonclient virtualenv's python (scripts/oip_peers.sh), never imported by the project's
tests: tritonclient's generated `inference` stubs need protobuf < 7 and clash with any other
copy of the OIP protos in one process. Reads a spec on stdin (or a file named by argv[1]):

    {"url": "127.0.0.1:50051", "headers": {"x-api-key": "..."},
     "calls": [{"call": "infer_fp32", "model": "echo", "headers": {"x-request-id": "r1"}}, ...]}

Each call's `headers` are added to the spec-wide ones. Prints one JSON list, one result per call:
`{"call", "ok": true, ...}` or `{"call", "ok": false, "exception", "status", "message",
"debug_details", "details_bin"}`, where `details_bin` is the base64 `grpc-status-details-bin`
trailer (a `google.rpc.Status`): tritonclient's InferenceServerException keeps only the code and
message, but it is raised while handling the `grpc.RpcError` (`raise ... from None` hides it
from tracebacks, not from `__context__`), whose trailers still hold the details.

Calls: is_server_live, is_server_ready, is_model_ready, get_model_metadata, get_server_metadata,
infer_fp32, infer_bytes, infer_fail; each also as `aio_<call>` with `tritonclient.grpc.aio`.
"""
from __future__ import annotations

import asyncio
import base64
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException

FP32 = [1.5, -2.0, 3.25, 1e-30, 65504.0]
BYTES = [b"hello", b"\x00\xff\xfe binary\n", "\u00fcn\u00efc\u00f6de \u2713".encode()]


def _inputs(call: str, spec: dict[str, Any], module: Any) -> list[Any]:
    if call == "infer_bytes":
        values = [base64.b64decode(v) for v in spec["bytes_b64"]] if "bytes_b64" in spec else BYTES
        tensor = module.InferInput(spec.get("input", "s"), [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_))
        return [tensor]
    floats = np.array(spec.get("values", FP32), dtype=np.float32).reshape(1, -1)
    tensor = module.InferInput("fail" if call == "infer_fail" else spec.get("input", "x"),
                               list(floats.shape), "FP32")
    tensor.set_data_from_numpy(floats)
    return [tensor]


def _outputs(result: Any) -> dict[str, Any]:
    response = result.get_response()
    outputs: dict[str, Any] = {}
    for output in response.outputs:
        array = result.as_numpy(output.name)
        entry: dict[str, Any] = {"datatype": output.datatype, "shape": list(array.shape)}
        if output.datatype == "BYTES":
            entry["bytes_b64"] = [base64.b64encode(v).decode() for v in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
            entry["raw_hex"] = array.astype(array.dtype.newbyteorder("<")).tobytes().hex()
        outputs[output.name] = entry
    return {"model_name": response.model_name, "id": response.id, "outputs": outputs}


async def _perform(client: Any, module: Any, call: str, spec: dict[str, Any],
                   headers: dict[str, str]) -> dict[str, Any]:
    async def done(value: Any) -> Any:
        return await value if inspect.isawaitable(value) else value

    model = spec.get("model", "echo")
    if call in ("is_server_live", "is_server_ready"):
        return {"value": await done(getattr(client, call)(headers=headers))}
    if call == "is_model_ready":
        return {"value": await done(client.is_model_ready(model, headers=headers))}
    if call == "get_model_metadata":
        metadata = await done(client.get_model_metadata(model, headers=headers))
        return {"metadata": MessageToDict(metadata, preserving_proto_field_name=True)}
    if call == "get_server_metadata":
        metadata = await done(client.get_server_metadata(headers=headers))
        return {"metadata": MessageToDict(metadata, preserving_proto_field_name=True)}
    if call in ("infer_fp32", "infer_bytes", "infer_fail"):
        result = await done(client.infer(model, _inputs(call, spec, module), headers=headers,
                                         request_id=spec.get("oip_request_id", "")))
        return _outputs(result)
    raise ValueError(f"unknown call {call!r}")


def _failure(exc: BaseException) -> dict[str, Any]:
    failure: dict[str, Any] = {"exception": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, InferenceServerException):
        failure.update(status=exc.status(), message=exc.message(), debug_details=exc.debug_details())
    cause = exc.__cause__ or exc.__context__
    trailers = getattr(cause, "trailing_metadata", None)
    details = None
    if callable(trailers):
        for key, value in trailers() or ():
            if key == "grpc-status-details-bin":
                details = base64.b64encode(value).decode()
    failure["details_bin"] = details
    return failure


async def _run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for one in spec["calls"]:
        name: str = one["call"]
        aio = name.startswith("aio_")
        call = name.removeprefix("aio_")
        module = aioclient if aio else grpcclient
        headers = {**spec.get("headers", {}), **one.get("headers", {})}
        client = module.InferenceServerClient(spec["url"])
        try:
            result = {"call": name, "ok": True, **await _perform(client, module, call, one, headers)}
        except Exception as exc:  # noqa: BLE001 - every failure is the result being reported
            result = {"call": name, "ok": False, **_failure(exc)}
        finally:
            closed = client.close()
            if inspect.isawaitable(closed):
                await closed
        results.append(result)
    return results


def main() -> None:
    text = Path(sys.argv[1]).read_text() if len(sys.argv) > 1 else sys.stdin.read()
    json.dump(asyncio.run(_run(json.loads(text))), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
