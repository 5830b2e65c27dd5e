"""The key table and glob matching of the authentication stage (pure)."""
from __future__ import annotations

import asyncio
import hashlib

import pytest
from sidecar_client.inference.v1.inference_pb2 import InferRequest

from sidecar.call import begin_call
from sidecar.config import AuthConfig, parse_config
from sidecar.errors import SidecarError
from sidecar.stages.auth import Authenticate, KeyTable

MODELS = "models: {chat: {backends: [{name: a, address: 'h:1'}]}}\n"


def auth_config(*keys: tuple[str, str, list[str]]) -> AuthConfig:
    return AuthConfig.model_validate({"api_keys": [
        {"id": f"k{i}", "sha256": hashlib.sha256(k.encode()).hexdigest(), "org": org, "models": models}
        for i, (k, org, models) in enumerate(keys)]})


@pytest.mark.parametrize(("globs", "model", "allowed"), [
    (["*"], "anything", True),
    (["chat"], "chat", True),
    (["chat"], "chat-2", False),
    (["chat-*"], "chat-2", True),
    (["chat-*", "embed"], "embed", True),
    (["gpt-?"], "gpt-4", True),
    (["gpt-?"], "gpt-40", False),
    (["a.b"], "aXb", False),  # '.' is literal in globs
])
def test_model_globs(globs: list[str], model: str, allowed: bool) -> None:
    principal = KeyTable(auth_config(("key", "acme", globs))).lookup("key")
    assert principal is not None and principal.may_call(model) is allowed


def test_lookup_by_digest_only() -> None:
    table = KeyTable(auth_config(("sk-1", "acme", ["*"])))
    assert table.lookup("sk-1") is not None
    assert table.lookup("sk-2") is None
    assert "sk-1" not in repr(table)


def test_the_stage_follows_the_config_in_force() -> None:
    holder = {"config": parse_config(MODELS + "auth: {api_keys: [{id: a, sha256: '"
                                     + hashlib.sha256(b"old").hexdigest() + "', org: acme}]}")}
    stage = Authenticate(lambda: holder["config"])

    def admit(key: str) -> str:
        call = begin_call("Infer", InferRequest(model="chat").SerializeToString(), (("x-api-key", key),), None)
        call.parse()
        asyncio.run(stage(call))
        return call.org

    assert admit("old") == "acme"
    holder["config"] = parse_config(MODELS + "auth: {api_keys: [{id: b, sha256: '"
                                    + hashlib.sha256(b"new").hexdigest() + "', org: globex}]}")
    assert admit("new") == "globex"
    with pytest.raises(SidecarError) as failure:
        admit("old")
    assert failure.value.reason == "INVALID_API_KEY"
