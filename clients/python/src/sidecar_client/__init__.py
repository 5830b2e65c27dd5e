"""Client stubs for the inference routing sidecar.

The generated modules mirror the proto packages::

    from sidecar_client.inference.v1 import inference_pb2, inference_pb2_grpc
    from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc
    from sidecar_client.sidecar.usage.v1 import usage_pb2
    from sidecar_client.inference import grpc_service_pb2, grpc_service_pb2_grpc  # OIP (KServe v2)

The OIP stubs (package `inference`, service `GRPCInferenceService`) register the same protobuf
names as tritonclient's and MLServer's: they cannot be imported in one process with those.
Nothing here imports them unless asked.

`SidecarClient` is a small asyncio helper on top of them; `error_info` reads the
`google.rpc.ErrorInfo` (reason, metadata) that every sidecar error carries.
"""
from __future__ import annotations

from sidecar_client.helpers import ErrorDetail, SidecarClient, error_detail

__all__ = ["ErrorDetail", "SidecarClient", "error_detail"]
