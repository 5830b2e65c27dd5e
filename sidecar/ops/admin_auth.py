"""Admin tokens: every call on `admin_listen` needs one, except gRPC health.

An interceptor on the admin server only (the inference hot path never pays for it). Tokens are
configured as SHA-256 digests (`auth.admin_tokens`), read from `authorization: Bearer <token>`,
and never logged or echoed. Health is exempt so that kubelet `grpc:` probes, which carry no
credentials, keep working. Refusals use the error catalog like every other error:
UNAUTHENTICATED / `UNAUTHORIZED` without a token, UNAUTHENTICATED / `INVALID_API_KEY` with an
unknown one (an API key is not an admin token).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc

from sidecar import errors
from sidecar.call import new_request_id
from sidecar.config import AuthConfig, Config, PerConfig
from sidecar.errors import SidecarError

log = logging.getLogger("sidecar.admin")
# the admin token id of the call being served (the interceptor and the handler share one context)
ADMIN_TOKEN_ID: ContextVar[str] = ContextVar("admin_token_id", default="")
EXEMPT_PREFIX = "/grpc.health.v1.Health/"
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]


def token_ids(auth: AuthConfig | None) -> dict[str, str]:
    """Digest -> token id, built once per config."""
    return {t.sha256: t.id for t in auth.admin_tokens} if auth else {}


class AdminAuth(grpc.aio.ServerInterceptor):
    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._tokens = PerConfig(token_ids)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
            details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIX):
            return handler
        refusal = self._refusal(details)
        if refusal is None:
            return handler
        return _refusing(handler, refusal)

    def _refusal(self, details: grpc.HandlerCallDetails) -> SidecarError | None:
        token = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                token = value[7:].strip()
        if not token:
            return SidecarError("UNAUTHORIZED", "admin calls need 'authorization: Bearer <admin token>'")
        token_id = self._tokens.get(self._config().auth).get(hashlib.sha256(token.encode()).hexdigest())
        if token_id is None:
            return SidecarError("INVALID_API_KEY", "the admin token is not valid")
        log.info("admin call", extra={"method": details.method, "admin_token_id": token_id})
        ADMIN_TOKEN_ID.set(token_id)
        return None


def _refusing(handler: Handler, refusal: SidecarError) -> Handler:
    """A handler of the same shape as `handler` that ends the call with `refusal`."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        rescued = errors.rescue(refusal, new_request_id())
        await context.abort(rescued.code, rescued.message, rescued.trailing_metadata)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
