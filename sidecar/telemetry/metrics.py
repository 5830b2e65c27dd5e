"""Every metric the sidecar exports, declared once, with fixed and bounded label names.

Label values come from config (org, key id, model, backend, limit name) or from small fixed
sets (codes, reasons): never from a request id or other caller input.
"""
from __future__ import annotations

from prometheus_client import Counter

RATE_LIMIT_DENIALS = Counter(
    "api_router_rate_limit_denials", "Calls denied by a rate limit.", ["org", "limit"])
RATE_LIMIT_SHADOW_DENIALS = Counter(
    "api_router_rate_limit_shadow_denials", "Calls a shadow rate limit would have denied (admitted).",
    ["org", "limit"])
