"""The `sidecar` command (CONTRACT §1)."""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from sidecar import __version__
from sidecar.cli_tls import TlsOptionError, add_tls_options, aio_channel, channel_tls


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        sys.exit(2)
    code = args.handler(args)
    sys.exit(code or 0)


def _version(_args: argparse.Namespace) -> int:
    from sidecar.telemetry.build import build_info

    print(json.dumps(build_info()))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="gRPC routing sidecar for model inference")
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", help="run the sidecar until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, metavar="FILE")
    run.set_defaults(handler=_run)

    demo = sub.add_parser("demo", help="run the sidecar and two demo backends on embedded defaults")
    demo.add_argument("--listen", default="127.0.0.1:50051")
    demo.add_argument("--admin-listen", default="127.0.0.1:50052")
    demo.add_argument("--ops-listen", default="127.0.0.1:9464")
    demo.set_defaults(handler=_demo)

    check = sub.add_parser("check-config", help="validate a config file (exit 0, or 2 with one line per error)")
    check.add_argument("file")
    check.set_defaults(handler=_check_config)

    version = sub.add_parser("version", help="print the version, git commit and build time (JSON)")
    version.set_defaults(handler=_version)

    hash_key = sub.add_parser("hash-key", help="print the sha256: form of an API key or admin token")
    hash_key.add_argument("key")
    hash_key.set_defaults(handler=lambda a: print(hash_secret(a.key)))

    smoke = sub.add_parser("smoke", help="check a running sidecar end to end (defaults: `sidecar demo`); exit 1 "
                                         "on any failure")
    smoke.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT", help="the inference listener")
    smoke.add_argument("--admin", default="127.0.0.1:50052", metavar="HOST:PORT", help="the admin listener")
    smoke.add_argument("--ops", default="127.0.0.1:9464", metavar="HOST:PORT", help="the ops HTTP listener")
    smoke.add_argument("--api-key", default="demo-key", help="an API key allowed to call --model")
    smoke.add_argument("--admin-token", default="demo-admin")
    smoke.add_argument("--model", default="chat")
    smoke.add_argument("--skip-rate-limit", action="store_true",
                       help="leave out the check that exhausts the caller's rate limit")
    add_tls_options(smoke, listener="--target")
    add_tls_options(smoke, "admin-", listener="--admin")
    smoke.set_defaults(handler=_smoke)

    from sidecar.admin_cli import add_parser as add_admin_parser
    from sidecar.config_cli import add_parser as add_config_parser

    add_admin_parser(sub)
    add_config_parser(sub)

    call = sub.add_parser("call", help="call a sidecar (or a backend) once and print the answer")
    call.add_argument("--target", required=True, metavar="HOST:PORT")
    call.add_argument("--model", required=True)
    call.add_argument("--input", default="")
    call.add_argument("--stream", action="store_true", help="use InferStream and print chunks as they come")
    call.add_argument("--api-key", default=os.environ.get("SIDECAR_API_KEY"), help="default: $SIDECAR_API_KEY")
    call.add_argument("--max-output-tokens", type=int, default=0)
    call.add_argument("--session-id", default="")
    call.add_argument("--request-id", default=None)
    call.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    call.add_argument("--json", action="store_true", help="print the response message(s) as JSON")
    add_tls_options(call, listener="--target")
    call.set_defaults(handler=_call)

    backend = sub.add_parser("demo-backend", help="run the reference inference backend")
    backend.add_argument("--listen", required=True, metavar="HOST:PORT")
    backend.add_argument("--delay-ms", type=float, default=0.0)
    backend.add_argument("--fail-rate", type=float, default=0.0)
    backend.add_argument("--fail-code", default="UNAVAILABLE", help="gRPC code of injected failures")
    backend.add_argument("--tokens", type=int, default=8, help="tokens (stream chunks) per answer")
    backend.add_argument("--chunk-bytes", type=int, default=0, help="extra delta_bytes per chunk")
    backend.add_argument("--seed", type=int, default=None)
    backend.add_argument("--log-calls", action="store_true", help="one JSON line per call on stdout")
    backend.add_argument("--protocol", choices=("inference_v1", "oip"), default="inference_v1",
                         help="inference_v1 (inference.v1.Inference), or oip: an Open Inference Protocol "
                              "(KServe v2) echo model server")
    backend.add_argument("--models", default="", metavar="A,B",
                         help="oip: the models it serves (ModelReady); default: every name is ready")
    backend.add_argument("--prefix-cache-ms", type=float, default=0.0, metavar="MS",
                         help="simulate a prefix (KV) cache: a call whose input prefix was not seen "
                              "recently waits MS more before answering; default 0: off")
    backend.add_argument("--prefix-bytes", type=int, default=256, metavar="N",
                         help="with --prefix-cache-ms: the prefix is the input's first N bytes (default 256)")
    backend.add_argument("--prefix-cache-entries", type=int, default=1024, metavar="E",
                         help="with --prefix-cache-ms: the prefixes held, least recently used dropped (default 1024)")
    backend.add_argument("--tls-cert", metavar="FILE", help="serve over TLS with this PEM certificate (and --tls-key)")
    backend.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    backend.add_argument("--client-ca", metavar="FILE",
                         help="require callers' certificates signed by this PEM CA (mutual TLS; needs --tls-cert)")
    backend.set_defaults(handler=_demo_backend)

    spool = sub.add_parser("spool", help="the usage-record spool: status, or replay a stopped sidecar's spool")
    spool_sub = spool.add_subparsers(metavar="ACTION", required=True)
    status = spool_sub.add_parser("status", help="segments, records not yet acknowledged, oldest, torn tails")
    status.add_argument("--config", required=True, metavar="FILE")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=lambda a: _with_config(a, lambda c: tools().spool_status(c, a.json)))
    replay = spool_sub.add_parser("replay", help="send what a stopped sidecar left in its spool to Kafka")
    replay.add_argument("--config", required=True, metavar="FILE")
    replay.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for Kafka (default 60)")
    replay.set_defaults(handler=lambda a: _with_config(a, lambda c: tools().spool_replay(c, a.timeout)))

    dlq = sub.add_parser("dlq", help="usage records Kafka rejected for good: list, inspect, replay, resolve")
    dlq_sub = dlq.add_subparsers(metavar="ACTION", required=True)
    listing = dlq_sub.add_parser("list", help="open dead letters, with counts by reason")
    listing.add_argument("--config", required=True, metavar="FILE")
    listing.add_argument("--all", action="store_true", help="also replayed and resolved ones")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=lambda a: _with_config(a, lambda c: tools().dlq_list(c, a.all, a.json)))
    inspect = dlq_sub.add_parser("inspect", help="one dead letter, its record decoded")
    inspect.add_argument("event_id")
    inspect.add_argument("--config", required=True, metavar="FILE")
    inspect.set_defaults(handler=lambda a: _with_config(a, lambda c: tools().dlq_inspect(c, a.event_id)))
    dlq_replay = dlq_sub.add_parser("replay", help="send dead letters to Kafka again once the cause is fixed")
    dlq_replay.add_argument("event_ids", nargs="*", metavar="EVENT_ID")
    dlq_replay.add_argument("--all", action="store_true", help="every open dead letter")
    dlq_replay.add_argument("--config", required=True, metavar="FILE")
    dlq_replay.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka (default 30)")
    dlq_replay.set_defaults(handler=_dlq_replay)
    resolve = dlq_sub.add_parser("resolve", help="mark dead letters handled, with a note")
    resolve.add_argument("event_ids", nargs="+", metavar="EVENT_ID")
    resolve.add_argument("--note", required=True, help="what was done about it (kept with the record)")
    resolve.add_argument("--config", required=True, metavar="FILE")
    resolve.set_defaults(handler=lambda a: _with_config(a, lambda c: tools().dlq_resolve(c, a.event_ids, a.note)))
    return parser


def tools() -> Any:
    from sidecar.usage import tools as usage_tools

    return usage_tools


def _with_config(args: argparse.Namespace, command: Callable[[Any], int]) -> int:
    """The config FILE holds, or for a bootstrap of an etcd source the one its sidecar last ran
    (its cache file): the spool and DLQ are on this machine, so etcd is not asked."""
    from sidecar.config import ConfigError, load_bootstrap
    from sidecar.config_etcd import cached_config

    try:
        bootstrap = load_bootstrap(args.config)
        config = bootstrap.config or cached_config(bootstrap.source)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    return command(config)


def _dlq_replay(args: argparse.Namespace) -> int:
    if bool(args.event_ids) == args.all:
        print("name the EVENT_IDs to replay, or --all", file=sys.stderr)
        return 2
    return _with_config(args, lambda c: tools().dlq_replay(c, args.event_ids, args.all, args.timeout))


def hash_secret(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def run_async(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Runs `main` on uvloop (the sidecar's event loop)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _run(args: argparse.Namespace) -> int:
    """The file is the config, or the bootstrap of an etcd source: then the config is read from
    etcd (or the cache) inside the event loop that will serve, before the sidecar is built."""
    # before grpc is imported: its default logs a plain-text line per failed TLS handshake,
    # which anyone who reaches a TLS listener could fill the log with (GRPC_VERBOSITY=INFO: see them)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from sidecar.config import ConfigError, load_bootstrap
    from sidecar.telemetry.logging import configure_logging

    configure_logging()  # JSON until the config says otherwise
    try:
        bootstrap = load_bootstrap(args.config)
        if bootstrap.config is not None:
            _make_spool_dir(bootstrap.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    config = bootstrap.config
    if config is None:
        return _serve(_from_etcd(bootstrap.source))
    configure_logging(log_format=config.telemetry.log_format)
    return _serve(_from_file(config, bootstrap.text, args.config))


def _make_spool_dir(config: Any) -> None:
    """Creates the Kafka spool's directory before anything starts, so that a path check-config
    could not fault (a race, a read-only mount) still ends in exit 2 naming the key."""
    from sidecar.config import ConfigError

    if config.usage.sink != "kafka":
        return
    try:
        os.makedirs(config.usage.spool_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError([f"usage.spool_dir: cannot create {config.usage.spool_dir}: {exc.strerror or exc}"]) from None


def _from_file(config: Any, text: str, path: str) -> Callable[[], Coroutine[Any, Any, None]]:
    from sidecar.app import Sidecar, config_version

    version = config_version(text)  # of the text validated: the file may have changed since

    async def serve() -> None:
        await Sidecar(config, version, config_path=path).run_until_signalled()  # the path: for reloads

    return serve


def _from_etcd(source: Any) -> Callable[[], Coroutine[Any, Any, None]]:
    from sidecar.app import Sidecar, config_version
    from sidecar.config_etcd import EtcdConfigSource
    from sidecar.telemetry.logging import configure_logging

    async def serve() -> None:
        etcd = EtcdConfigSource(source)
        try:
            initial = await etcd.load_initial()  # etcd's config, or the cache's; else ConfigError
            _make_spool_dir(initial.config)
        except BaseException:
            await etcd.aclose()
            raise
        configure_logging(log_format=initial.config.telemetry.log_format)
        await Sidecar(initial.config, config_version(initial.text), config_source=etcd).run_until_signalled()

    return serve


def _serve(serve: Callable[[], Coroutine[Any, Any, None]]) -> int:
    from sidecar.config import ConfigError
    from sidecar.memory import give_large_blocks_back

    give_large_blocks_back()  # before the first request: large buffers are unmapped when freed
    try:
        run_async(serve)
    except ConfigError as exc:  # an etcd source with no config to start from
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from sidecar.config import ConfigError, load_bootstrap

    try:
        bootstrap = load_bootstrap(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 2
    where = "" if bootstrap.config else f" (a bootstrap: the config is kept in etcd key {bootstrap.source.key})"
    print(f"{args.file}: ok{where}")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from sidecar.smoke import Options, run_smoke

    try:
        target_tls, admin_tls = channel_tls(args), channel_tls(args, "admin-")
    except TlsOptionError as exc:
        print(f"sidecar smoke: {exc}", file=sys.stderr)
        return 2
    return run_smoke(Options(target=args.target, admin=args.admin, ops=args.ops, api_key=args.api_key,
                             admin_token=args.admin_token, model=args.model, skip_rate_limit=args.skip_rate_limit,
                             target_tls=target_tls, admin_tls=admin_tls))


def _demo(args: argparse.Namespace) -> int:
    from sidecar.demo.demo import run_demo

    return run_demo(args.listen, args.admin_listen, args.ops_listen)


def _demo_backend(args: argparse.Namespace) -> int:
    from sidecar.demo.backend import DemoOptions, run_backend

    if (args.tls_cert is None) != (args.tls_key is None) or (args.client_ca and not args.tls_cert):
        print("demo-backend: --tls-cert and --tls-key go together; --client-ca needs them", file=sys.stderr)
        return 2
    if args.prefix_cache_ms < 0 or args.prefix_bytes < 1 or args.prefix_cache_entries < 1:
        print("demo-backend: --prefix-cache-ms must be >= 0, --prefix-bytes and --prefix-cache-entries >= 1",
              file=sys.stderr)
        return 2
    run_backend(args.listen, DemoOptions(tokens=args.tokens, delay_ms=args.delay_ms, fail_rate=args.fail_rate,
                                         fail_code=args.fail_code.upper(), chunk_bytes=args.chunk_bytes,
                                         log_calls=args.log_calls, seed=args.seed, tls_cert=args.tls_cert,
                                         tls_key=args.tls_key, client_ca=args.client_ca, protocol=args.protocol,
                                         models=tuple(m for m in args.models.split(",") if m),
                                         prefix_cache_ms=args.prefix_cache_ms, prefix_bytes=args.prefix_bytes,
                                         prefix_cache_entries=args.prefix_cache_entries))
    return 0


def _call(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from sidecar_client import error_detail
    from sidecar_client.inference.v1 import inference_pb2, inference_pb2_grpc

    metadata: list[tuple[str, str]] = []
    if args.api_key:
        metadata.append(("authorization", f"Bearer {args.api_key}"))
    if args.request_id:
        metadata.append(("x-request-id", args.request_id))
    request = inference_pb2.InferRequest(model=args.model, input=args.input, session_id=args.session_id,
                                         max_output_tokens=args.max_output_tokens)
    try:
        tls = channel_tls(args)
    except TlsOptionError as exc:
        print(f"sidecar call: {exc}", file=sys.stderr)
        return 2

    async def call() -> int:
        async with aio_channel(args.target, tls) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            try:
                if args.stream:
                    rpc = stub.InferStream(request, metadata=metadata, timeout=args.timeout)
                    async for chunk in rpc:
                        if args.json:
                            print(json_format.MessageToJson(chunk, indent=None))
                        else:
                            print(chunk.delta, end="", flush=True)
                            if chunk.HasField("usage"):
                                print()
                                _summary(chunk.usage, chunk.finish_reason, await rpc.initial_metadata())
                else:
                    unary = stub.Infer(request, metadata=metadata, timeout=args.timeout)
                    response = await unary
                    if args.json:
                        print(json_format.MessageToJson(response, indent=None))
                    else:
                        print(response.output)
                        _summary(response.usage, response.finish_reason, await unary.initial_metadata())
            except grpc.aio.AioRpcError as exc:
                detail = error_detail(exc)
                print(json.dumps({"error": detail.code.name, "reason": detail.reason, "message": detail.message,
                                  "metadata": detail.metadata}), file=sys.stderr)
                return 1
        return 0

    result: int = asyncio.run(call())
    return result


def _summary(usage: Any, finish_reason: str, metadata: Any) -> None:
    request_id = next((v for k, v in (metadata or ()) if k == "x-request-id"), "")
    print(f"[request_id={request_id} input_tokens={usage.input_tokens} output_tokens={usage.output_tokens} "
          f"finish_reason={finish_reason}]", file=sys.stderr)
