"""A gRPC routing sidecar for model inference."""
__version__ = "0.1.0"
