"""`sidecar admin …`: the admin API from a shell, for operators and runbooks.

    sidecar admin routes [--model M]
    sidecar admin override MODEL BACKEND (--weight W | --drain | --pin) [--ttl SECONDS] [--reason TEXT]
    sidecar admin clear MODEL BACKEND
    sidecar admin audit REQUEST_ID

Each talks to the admin listener (`--admin HOST:PORT`, default 127.0.0.1:50052) with the token
from `--token` or `$SIDECAR_ADMIN_TOKEN`, and prints the answer as JSON (one object). A refused
call prints the error's reason as JSON on stderr and exits 1. An admin listener with
`tls.admin_listen` is reached with `--ca-file` (and `--cert-file`/`--key-file` when it requires
client certificates; `--server-name` when the address is not in its certificate): cli_tls.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from sidecar.cli_tls import TlsOptionError, add_tls_options, channel, channel_tls

ADMIN_DEFAULT = "127.0.0.1:50052"


def add_parser(sub: Any) -> None:
    admin = sub.add_parser("admin", help="the admin API: routes, overrides, audit (token: --token or "
                                         "$SIDECAR_ADMIN_TOKEN)")
    admin.add_argument("--admin", default=ADMIN_DEFAULT, metavar="HOST:PORT", help="the admin listener")
    admin.add_argument("--token", default=None, help="admin token (default: $SIDECAR_ADMIN_TOKEN)")
    admin.add_argument("--timeout", type=float, default=10.0)
    add_tls_options(admin, listener="the admin listener")
    actions = admin.add_subparsers(dest="action", required=True)
    routes = actions.add_parser("routes", help="models, backends, weights, health, overrides")
    routes.add_argument("--model", default="")
    override = actions.add_parser("override", help="set a backend's weight, drain it, or pin its model to it")
    override.add_argument("model")
    override.add_argument("backend")
    action = override.add_mutually_exclusive_group(required=True)
    action.add_argument("--weight", type=float)
    action.add_argument("--drain", action="store_true")
    action.add_argument("--pin", action="store_true")
    override.add_argument("--ttl", type=int, default=0, help="seconds until it expires (0: until cleared)")
    override.add_argument("--reason", default="")
    clear = actions.add_parser("clear", help="remove a backend's override")
    clear.add_argument("model")
    clear.add_argument("backend")
    audit = actions.add_parser("audit", help="the audit record of one request id")
    audit.add_argument("request_id")
    admin.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from sidecar_client import error_detail
    from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

    token = args.token or os.environ.get("SIDECAR_ADMIN_TOKEN", "")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        tls = channel_tls(args)
    except TlsOptionError as exc:
        print(f"sidecar admin: {exc}", file=sys.stderr)
        return 2
    with channel(args.admin, tls) as admin:
        routing, audit = admin_pb2_grpc.RoutingAdminStub(admin), admin_pb2_grpc.AuditStub(admin)
        try:
            if args.action == "routes":
                answer: Any = routing.ListRoutes(admin_pb2.ListRoutesRequest(model=args.model),
                                                 timeout=args.timeout, metadata=metadata)
            elif args.action == "override":
                request = admin_pb2.SetOverrideRequest(model=args.model, backend=args.backend,
                                                       ttl_seconds=args.ttl, reason=args.reason)
                if args.weight is not None:
                    request.weight = args.weight
                elif args.drain:
                    request.drain = True
                else:
                    request.pin = True
                answer = routing.SetOverride(request, timeout=args.timeout, metadata=metadata)
            elif args.action == "clear":
                answer = routing.ClearOverride(admin_pb2.ClearOverrideRequest(model=args.model, backend=args.backend),
                                               timeout=args.timeout, metadata=metadata)
            else:
                answer = audit.GetRequest(admin_pb2.GetRequestRequest(request_id=args.request_id),
                                          timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            detail = error_detail(exc)
            print(json.dumps({"error": detail.code.name, "reason": detail.reason, "message": detail.message,
                              "metadata": detail.metadata}), file=sys.stderr)
            return 1
    print(json_format.MessageToJson(answer, indent=2, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=args.action == "clear"))
    return 0
