"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) side of the sidecar.

`wire` reads the little the sidecar needs of an OIP message (the model's name and version)
straight off the wire; `service` serves the protocol on the `listen` port. The sidecar never
loads OIP message classes (see protos/inference/grpc_service.proto for why).
"""
