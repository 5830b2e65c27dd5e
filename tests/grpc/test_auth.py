"""Authentication through the public interface: API keys, model globs, and no key ever leaks."""
from __future__ import annotations

import hashlib
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sidecar_client import error_detail
from sidecar_client.inference.v1.inference_pb2 import InferRequest, InferResponse

from tests.grpc.test_errors import fail
from tests.grpc.test_proxy import INFER
from tests.harness.sidecar import (
    BackendProc,
    SidecarProc,
    health_status,
    one_model,
    sidecar_config,
    start_sidecar,
)

KEY_ALL = "sk-all-7d1f3c0e9b"
KEY_CHAT = "sk-chat-only-55aa21"
UNKNOWN = "sk-unknown-000111"
ADMIN = "adm-token-9c2e77f1"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def sidecar(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProc]:
    config = sidecar_config(f"""
        chat-small:
          backends: [{{name: a, address: "{backend.address}"}}]
        chat-large:
          backends: [{{name: a, address: "{backend.address}"}}]
        embed:
          backends: [{{name: a, address: "{backend.address}"}}]
        """) + f"""auth:
  api_keys:
    - {{id: app-all, sha256: "sha256:{digest(KEY_ALL)}", org: acme}}
    - {{id: app-chat, sha256: "{digest(KEY_CHAT).upper()}", org: globex, models: ["chat-*"]}}
  admin_tokens:
    - {{id: ops, sha256: "sha256:{digest(ADMIN)}"}}
"""
    proc = start_sidecar(tmp_path_factory.mktemp("sidecar"), config)
    try:
        yield proc
    finally:
        proc.proc.stop()


def call(target: str, model: str, metadata: tuple[tuple[str, str], ...]) -> InferResponse:
    with grpc.insecure_channel(target) as channel:
        raw = channel.unary_unary(INFER)(InferRequest(model=model, input="hi").SerializeToString(),
                                         metadata=metadata, timeout=10)
        return InferResponse.FromString(raw)


@pytest.mark.parametrize("metadata", [(("authorization", f"Bearer {KEY_ALL}"),), (("x-api-key", KEY_ALL),)],
                         ids=["bearer", "x-api-key"])
def test_a_valid_key_is_accepted_either_way(sidecar: SidecarProc, metadata: tuple[tuple[str, str], ...]) -> None:
    assert call(sidecar.listen, "embed", metadata).output.startswith("hi")


def test_no_credentials(sidecar: SidecarProc) -> None:
    detail = fail(sidecar.listen, InferRequest(model="embed"))
    assert (detail.code, detail.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHORIZED")


def test_unknown_key(sidecar: SidecarProc) -> None:
    detail = fail(sidecar.listen, InferRequest(model="embed"), metadata=(("authorization", f"Bearer {UNKNOWN}"),))
    assert (detail.code, detail.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")
    assert UNKNOWN not in detail.message and UNKNOWN not in str(detail.metadata)


def test_model_globs_limit_what_a_key_may_call(sidecar: SidecarProc) -> None:
    chat = (("x-api-key", KEY_CHAT),)
    assert call(sidecar.listen, "chat-small", chat).output
    assert call(sidecar.listen, "chat-large", chat).output
    detail = fail(sidecar.listen, InferRequest(model="embed"), metadata=chat)
    assert (detail.code, detail.reason) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN")
    assert detail.metadata == {"model": "embed", "api_key_id": "app-chat"}


def test_authentication_comes_before_routing(sidecar: SidecarProc) -> None:
    """An unauthenticated caller learns nothing about which models exist."""
    detail = fail(sidecar.listen, InferRequest(model="no-such-model"))
    assert detail.reason == "UNAUTHORIZED"


def test_no_key_in_any_log_or_error(sidecar: SidecarProc, backend: BackendProc) -> None:
    for key in (KEY_ALL, KEY_CHAT, UNKNOWN, ADMIN):
        for model in ("embed", "chat-small", "nope"):
            try:
                call(sidecar.listen, model, (("authorization", f"Bearer {key}"),))
            except grpc.RpcError as error:
                assert key not in (error.details() or "")
                assert all(key.encode() not in (v if isinstance(v, bytes) else v.encode())
                           for _, v in error.trailing_metadata() or ())
    for token in (ADMIN, KEY_ALL, UNKNOWN):
        try:
            list_services(sidecar.admin_listen, (("authorization", f"Bearer {token}"),))
        except grpc.RpcError as error:
            assert token not in (error.details() or "")
    logs = sidecar.proc.log_text() + backend.proc.log_text()
    for key in (KEY_ALL, KEY_CHAT, UNKNOWN, ADMIN):
        assert key not in logs
    with urllib.request.urlopen(f"{sidecar.ops_url}/metrics", timeout=2) as response:
        metrics = response.read().decode()
    assert not any(key in metrics for key in (KEY_ALL, KEY_CHAT, UNKNOWN, ADMIN))


def test_without_auth_the_sidecar_warns_at_start(backend: BackendProc, tmp_path_factory: pytest.TempPathFactory) -> None:
    open_sidecar = start_sidecar(tmp_path_factory.mktemp("open"), one_model(backend.address))
    try:
        assert call(open_sidecar.listen, "chat", ()).output
        assert any(line.get("level") == "warning" and "auth is not configured" in line.get("msg", "")
                   for line in open_sidecar.log_json())
    finally:
        open_sidecar.proc.stop()


# --- admin tokens on admin_listen -------------------------------------------------------------


def list_services(target: str, metadata: tuple[tuple[str, str], ...]) -> list[str]:
    """Server reflection's ListServices on `target` (the admin listener serves it to admin tokens)."""
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            metadata=metadata, timeout=10)
        return [s.name for answer in answers for s in answer.list_services_response.service]


def test_admin_calls_need_an_admin_token(sidecar: SidecarProc) -> None:
    assert "grpc.health.v1.Health" in list_services(sidecar.admin_listen, (("authorization", f"Bearer {ADMIN}"),))
    for metadata, reason in (((), "UNAUTHORIZED"),
                             ((("authorization", f"Bearer {KEY_ALL}"),), "INVALID_API_KEY"),  # an API key is no admin token
                             ((("authorization", f"Bearer {UNKNOWN}"),), "INVALID_API_KEY")):
        with pytest.raises(grpc.RpcError) as failure:
            list_services(sidecar.admin_listen, metadata)
        detail = error_detail(failure.value)
        assert (detail.code, detail.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)
    admin_lines = [line for line in sidecar.log_json() if line.get("msg") == "admin call"]
    assert admin_lines and admin_lines[-1]["admin_token_id"] == "ops"


def test_health_on_the_admin_listener_needs_no_token(sidecar: SidecarProc) -> None:
    """kubelet grpc: probes carry no credentials."""
    assert health_status(sidecar.admin_listen) == "SERVING"


def test_an_admin_token_is_no_api_key(sidecar: SidecarProc) -> None:
    detail = fail(sidecar.listen, InferRequest(model="embed"), metadata=(("authorization", f"Bearer {ADMIN}"),))
    assert detail.reason == "INVALID_API_KEY"
