"""`sidecar smoke`: checks a running sidecar end to end, from the outside, the way a caller and an
operator use it. Run it after a deploy (against the pod, e.g. through `kubectl port-forward`)
or against `sidecar demo` (its defaults are the demo's addresses and secrets).

Each check prints one line, `ok` or `FAIL` with what was expected; the exit code is 1 when any
check failed. The rate-limit check sends calls until one is refused with RATE_LIMIT_EXCEEDED:
it uses up the caller's rate for up to a minute, so `--skip-rate-limit` leaves it out where
that matters (a production sidecar serving real traffic under the same org). Listeners with TLS
are reached with `--ca-file` (and `--cert-file`/`--key-file` for mutual TLS) for `--target`, and
the same options prefixed `--admin-` for `--admin` (cli_tls.py).
"""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sidecar_client import error_detail
from sidecar_client.inference.v1 import inference_pb2, inference_pb2_grpc
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from sidecar.cli_tls import ChannelTls, channel

CONTRACT_METRICS = ("grpc_server_handled_total", "grpc_server_handling_seconds", "api_router_backend_requests_total",
                    "api_router_backend_request_duration_seconds", "api_router_routing_decisions_total",
                    "api_router_backend_healthy")
RATE_LIMIT_MAX_CALLS = 5000


@dataclass
class Options:
    target: str = "127.0.0.1:50051"
    admin: str = "127.0.0.1:50052"
    ops: str = "127.0.0.1:9464"
    api_key: str = "demo-key"
    admin_token: str = "demo-admin"
    model: str = "chat"
    skip_rate_limit: bool = False
    timeout: float = 10.0
    target_tls: ChannelTls | None = None   # None: plaintext (cli_tls.py)
    admin_tls: ChannelTls | None = None


@dataclass
class Smoke:
    options: Options
    results: list[tuple[str, bool, str]] = field(default_factory=list)
    request_id: str = ""

    def check(self, name: str, run: Callable[[], str]) -> None:
        """Runs one check: it returns what it saw, or raises AssertionError / grpc.RpcError."""
        started = time.perf_counter()
        try:
            detail, passed = run(), True
        except AssertionError as exc:
            detail, passed = str(exc) or "assertion failed", False
        except grpc.RpcError as exc:
            detail, passed = f"{exc.code().name}: {exc.details()}", False
        except (OSError, urllib.error.URLError, ValueError) as exc:
            detail, passed = f"{type(exc).__name__}: {exc}", False
        took = (time.perf_counter() - started) * 1000
        self.results.append((name, passed, detail))
        print(f"{'ok  ' if passed else 'FAIL'}  {name:<22} {detail} ({took:.0f} ms)", flush=True)

    # --- the checks ------------------------------------------------------------------------------

    def health(self) -> str:
        statuses = {}
        for where, target, tls in (("listen", self.options.target, self.options.target_tls),
                                   ("admin", self.options.admin, self.options.admin_tls)):
            with channel(target, tls) as health:
                stub = health_pb2_grpc.HealthStub(health)
                for service in ("", "liveness"):
                    answer = stub.Check(  # type: ignore[attr-defined]
                        health_pb2.HealthCheckRequest(service=service), timeout=self.options.timeout)
                    statuses[f"{where}:{service or 'readiness'}"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
                        answer.status)
        assert set(statuses.values()) == {"SERVING"}, f"expected SERVING everywhere, got {statuses}"
        ready, body = _http_json(f"http://{self.options.ops}/readyz", self.options.timeout)
        live, build = _http_json(f"http://{self.options.ops}/healthz", self.options.timeout)
        assert (ready, live) == (200, 200), f"/readyz {ready}, /healthz {live} (expected 200): {body}"
        return f"gRPC health SERVING, /readyz 200, version {build.get('version')} commit {build.get('commit')}"

    def unary(self) -> str:
        request = inference_pb2.InferRequest(model=self.options.model, input="smoke test", max_output_tokens=4)
        with self._target() as target:
            response, call = inference_pb2_grpc.InferenceStub(target).Infer.with_call(
                request, timeout=self.options.timeout, metadata=self._caller())
        self.request_id = str(dict(call.initial_metadata()).get("x-request-id", ""))
        assert self.request_id, "no x-request-id in the response's initial metadata"
        assert response.output, "an empty answer"
        return f"{response.usage.output_tokens} tokens, request id {self.request_id}"

    def stream(self) -> str:
        request = inference_pb2.InferRequest(model=self.options.model, input="smoke test", max_output_tokens=4)
        with self._target() as target:
            chunks = list(inference_pb2_grpc.InferenceStub(target).InferStream(
                request, timeout=self.options.timeout, metadata=self._caller()))
        assert chunks, "the stream ended without a chunk"
        assert chunks[-1].HasField("usage"), "the last chunk carries no usage"
        return f"{len(chunks)} chunks, finish_reason {chunks[-1].finish_reason or '-'}"

    def auth_failure(self) -> str:
        request = inference_pb2.InferRequest(model=self.options.model, input="smoke test")
        with self._target() as target:
            try:
                inference_pb2_grpc.InferenceStub(target).Infer(
                    request, timeout=self.options.timeout, metadata=(("x-api-key", "sk-smoke-not-a-key"),))
            except grpc.RpcError as error:
                reason = error_detail(error).reason
                assert (error.code(), reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY"), (
                    f"expected UNAUTHENTICATED / INVALID_API_KEY, got {error.code().name} / {reason}")
                return "a wrong key is refused: UNAUTHENTICATED / INVALID_API_KEY"
        raise AssertionError("a wrong API key was accepted")

    def rate_limit(self) -> str:
        request = inference_pb2.InferRequest(model=self.options.model, input="smoke test", max_output_tokens=4)
        with self._target() as target:
            infer = inference_pb2_grpc.InferenceStub(target).Infer

            def one(_: int) -> tuple[str, str]:
                try:
                    infer(request, timeout=self.options.timeout, metadata=self._caller())
                except grpc.RpcError as error:
                    return error.code().name, error_detail(error).reason
                return "OK", ""

            sent = 0
            with ThreadPoolExecutor(max_workers=8) as pool:
                while sent < RATE_LIMIT_MAX_CALLS:
                    outcomes = list(pool.map(one, range(sent, sent + 64)))
                    sent += len(outcomes)
                    denied = [o for o in outcomes if o[1] == "RATE_LIMIT_EXCEEDED"]
                    others = {o for o in outcomes if o[0] != "OK" and o[1] != "RATE_LIMIT_EXCEEDED"}
                    assert not others, f"calls failed for another reason: {sorted(others)}"
                    if denied:
                        assert denied[0][0] == "RESOURCE_EXHAUSTED", f"denied with {denied[0][0]}"
                        return f"RESOURCE_EXHAUSTED / RATE_LIMIT_EXCEEDED after {sent} calls or fewer"
        raise AssertionError(f"no call of {sent} was rate limited (does the caller's org have a limit?)")

    def metrics(self) -> str:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.options.ops}/metrics", timeout=self.options.timeout) as response:
            text = response.read().decode()
        names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
        names |= {n.removesuffix("_bucket") for n in names}
        missing = [m for m in CONTRACT_METRICS if m not in names]
        assert not missing, f"/metrics lacks {missing}"
        return f"{len(names)} series names, the contract's present"

    def audit(self) -> str:
        assert self.request_id, "no request id to look up (the unary check failed)"
        with self._admin_channel() as admin:
            record = admin_pb2_grpc.AuditStub(admin).GetRequest(
                admin_pb2.GetRequestRequest(request_id=self.request_id), timeout=self.options.timeout,
                metadata=self._admin())
        assert record.usage.request_id == self.request_id, f"the record is of {record.usage.request_id!r}"
        return f"org {record.usage.org}, backend {record.usage.backend}, status {record.usage.status}"

    def routes(self) -> str:
        with self._admin_channel() as admin:
            answer = admin_pb2_grpc.RoutingAdminStub(admin).ListRoutes(
                admin_pb2.ListRoutesRequest(), timeout=self.options.timeout, metadata=self._admin())
        models = {r.model: [b.name for b in r.backends] for r in answer.routes}
        assert self.options.model in models, f"model {self.options.model!r} not in {sorted(models)}"
        return ", ".join(f"{m}: {'/'.join(b)}" for m, b in sorted(models.items()))

    # ----------------------------------------------------------------------------------------------

    def _target(self) -> grpc.Channel:
        return channel(self.options.target, self.options.target_tls)

    def _admin_channel(self) -> grpc.Channel:
        return channel(self.options.admin, self.options.admin_tls)

    def _caller(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.options.api_key),)

    def _admin(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.options.admin_token}"),)

    def run(self) -> int:
        tls = {"target": self.options.target_tls, "admin": self.options.admin_tls}
        over = ", ".join(f"{name} over TLS" for name, t in tls.items() if t is not None)
        print(f"smoke test of the sidecar at {self.options.target} (admin {self.options.admin}, "
              f"ops {self.options.ops}{'; ' + over if over else ''})", flush=True)
        self.check("health", self.health)
        self.check("unary call", self.unary)
        self.check("streamed call", self.stream)
        self.check("auth failure", self.auth_failure)
        self.check("metrics", self.metrics)
        self.check("audit lookup", self.audit)
        self.check("admin ListRoutes", self.routes)
        if not self.options.skip_rate_limit:
            self.check("rate-limit denial", self.rate_limit)
        failed = [name for name, passed, _ in self.results if not passed]
        print(f"{len(self.results) - len(failed)} of {len(self.results)} checks passed"
              + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
        return 1 if failed else 0


def _http_json(url: str, timeout: float) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def run_smoke(options: Options) -> int:
    try:
        return Smoke(options).run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
