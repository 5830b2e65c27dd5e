"""Authenticate: API key -> key id, org and the models the key may call.

First stage of every call: nothing else (limits, routing) runs for an unknown caller. Keys are
configured only as SHA-256 digests; the caller's key is hashed once and looked up, and is never
stored, logged or forwarded. With no `auth` section, every caller is accepted as org
`anonymous` (the sidecar logs a warning at start).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import translate

from sidecar.call import Call
from sidecar.config import ApiKeyConfig, AuthConfig, Config, PerConfig
from sidecar.errors import SidecarError

ANONYMOUS_ORG = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    org: str
    allowed: re.Pattern[str]  # the key's model globs, compiled into one pattern

    def may_call(self, model: str) -> bool:
        return self.allowed.fullmatch(model) is not None


def _models_pattern(globs: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{translate(g)})" for g in globs))


class KeyTable:
    """Digest -> Principal, built once per config."""

    def __init__(self, auth: AuthConfig) -> None:
        self._by_digest = {k.sha256: self._principal(k) for k in auth.api_keys}

    @staticmethod
    def _principal(key: ApiKeyConfig) -> Principal:
        return Principal(key.id, key.org, _models_pattern(key.models))

    def lookup(self, api_key: str) -> Principal | None:
        return self._by_digest.get(hashlib.sha256(api_key.encode()).hexdigest())

    def __repr__(self) -> str:
        return f"<KeyTable {len(self._by_digest)} keys>"


class Authenticate:
    span_name = "sidecar.auth"

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config
        self._keys = PerConfig(KeyTable)

    async def __call__(self, call: Call) -> None:
        auth = self._config().auth
        if auth is None:
            call.org = ANONYMOUS_ORG
            call.decide("auth", "allow", "anonymous: no auth configured")
            return
        if call.api_key is None:
            raise SidecarError("UNAUTHORIZED", "missing credentials: send 'authorization: Bearer <key>' "
                               "or 'x-api-key: <key>'")
        principal = self._keys.get(auth).lookup(call.api_key)
        if principal is None:
            raise SidecarError("INVALID_API_KEY", "the API key is not valid")
        call.org, call.api_key_id = principal.org, principal.key_id
        if not principal.may_call(call.request.model):
            call.decide("auth", "deny", f"FORBIDDEN: {principal.key_id} may not call {call.request.model}")
            raise SidecarError("FORBIDDEN", f"this API key may not call model {call.request.model!r}",
                               metadata={"model": call.request.model, "api_key_id": principal.key_id})
        call.decide("auth", "allow", principal.key_id)
