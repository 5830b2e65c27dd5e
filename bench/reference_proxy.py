"""The cost of one bare Python gRPC hop: a grpc.aio proxy that forwards raw bytes, nothing else.

    python bench/reference_proxy.py --listen 127.0.0.1:7001 --backend 127.0.0.1:7000 [--uvloop] [--request-id]

With --request-id it also does the one thing CONTRACT §2 demands of every hop that grpc.aio makes
expensive: a fresh x-request-id sent to the backend and echoed in the response's initial metadata
(a separate batch operation in grpc.aio). That variant prices the contract's minimum, not ours.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc

SERVICE = "inference.v1.Inference"


async def serve(listen: str, backend: str, request_id: bool) -> None:
    channel = grpc.aio.insecure_channel(backend)
    # No (de)serializers anywhere: bytes in, bytes out.
    infer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Infer")
    infer_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
        f"/{SERVICE}/InferStream")

    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            if request_id:
                metadata = (("x-request-id", os.urandom(16).hex()),)
                call = infer(request, timeout=context.time_remaining(), metadata=metadata)
                await context.send_initial_metadata(metadata)
                return await call
            return await infer(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")
            raise  # unreachable: abort raises

    async def stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in infer_stream(request, timeout=context.time_remaining()):
                yield chunk
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Infer": grpc.unary_unary_rpc_method_handler(unary),
        "InferStream": grpc.unary_stream_rpc_method_handler(stream),
    })
    await serve_until_signalled(grpc.aio.server(handlers=(handler,)), listen)
    await channel.close()


async def serve_until_signalled(server: grpc.aio.Server, listen: str) -> None:
    """Serves on `listen` (plaintext) until SIGTERM or SIGINT, then stops with a second's grace."""
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on")
    parser.add_argument("--backend", required=True, help="HOST:PORT of the Inference backend")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    parser.add_argument("--request-id", action="store_true",
                        help="forward a new x-request-id and echo it in initial metadata (unary)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.listen, args.backend, args.request_id))
    else:
        asyncio.run(serve(args.listen, args.backend, args.request_id))


if __name__ == "__main__":
    main()
