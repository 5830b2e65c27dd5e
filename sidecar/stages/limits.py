"""Limits: every rate limit and budget of a call, decided and charged in one store round trip.

Runs after authentication and model resolution (org, key id and model are known) and before a
backend is picked, so a throttled call never takes one. Token rates and budgets are charged an
estimate now (input size + max_output_tokens) and corrected when the call ends (`finish`) to
what the call is billed (billing.py): the backend's reported usage, the estimate for every
attempt the backend may have worked on without reporting, nothing when no backend worked on it.

Open Inference Protocol calls carry no tokens: token rates and token budgets do not apply to
them (they would charge 0 anyway); request rates and cost budgets do, a call reserving its
model's `per_request` price.

Denials: RESOURCE_EXHAUSTED / RATE_LIMIT_EXCEEDED with RetryInfo (the real wait) and the
limit's name, or RESOURCE_EXHAUSTED / BUDGET_EXCEEDED with QuotaFailure.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from sidecar.billing import bill
from sidecar.call import OIP, Call
from sidecar.config import Config, PerConfig, RateRule
from sidecar.errors import SidecarError
from sidecar.limits.budget import MICROS, Budget, cost_micros, day_window, estimate_tokens, month_window
from sidecar.limits.gcra import Rate
from sidecar.limits.reservation import Reservation
from sidecar.limits.store import Ask, LimitStore, Verdict, budget_key, rate_key
from sidecar.telemetry.metrics import (
    BUDGET_DENIALS,
    LIMIT_DECISION_SECONDS,
    RATE_LIMIT_DENIALS,
    RATE_LIMIT_SHADOW_DENIALS,
)

log = logging.getLogger("sidecar.limits")


def rates_of(prefix: str, rule: RateRule) -> list[Rate]:
    """The rates of one config rule (an org's, a key's, an org's on one model).

    A burst defaults to one minute's amount, and is at least one unit: a request costs one whole
    request however slow its rate (0.25/min is one every 4 minutes), and a token rate holds at
    least one token (a call larger than its burst is charged the burst, then settled)."""
    rates = []
    if rule.requests_per_minute is not None:
        rates.append(Rate(f"{prefix}:requests_per_minute", rule.requests_per_minute / 60.0,
                          float(rule.burst or max(1.0, rule.requests_per_minute)), rule.shadow))
    if rule.tokens_per_minute is not None:
        rates.append(Rate(f"{prefix}:tokens_per_minute", rule.tokens_per_minute / 60.0,
                          float(rule.token_burst or max(1.0, rule.tokens_per_minute)), rule.shadow, tokens=True))
    return rates


class _Plan(NamedTuple):
    """The rates of one (org, key id, model, protocol), with what every call of theirs repeats:
    the store keys and the audit decision's detail. Made once per config and combination (all
    of them come from the config: the model is resolved before this stage), not per call."""

    rates: tuple[Rate, ...]
    keys: tuple[str, ...]
    detail: str                  # the names, for the call's "rate_limit allow" decision
    tokens: bool                 # some rate counts tokens: the call holds a reservation


class _Budgets(NamedTuple):
    """An org's budgets in one day's calendar windows, with their store keys and names."""

    day_number: int
    budgets: tuple[Budget, ...]
    keys: tuple[str, ...]
    detail: str


class LimitTable:
    """The rates and budgets of one config, by org, key id and (org, model); built once per config."""

    def __init__(self, config: Config) -> None:
        limits, budgets = config.limits, config.budgets
        self.orgs = {org: rates_of(f"org:{org}", rule) for org, rule in limits.orgs.items()}
        self.keys = {key: rates_of(f"key:{key}", rule) for key, rule in limits.api_keys.items()}
        self.org_models = {(org, model): rates_of(f"org:{org}:model:{model}", model_rule)
                           for org, rule in limits.orgs.items() for model, model_rule in rule.models.items()}
        self.caps = {org: rule.caps() for org, rule in budgets.orgs.items()}
        self.prices = budgets.prices
        self._budgets: dict[str, _Budgets] = {}
        self._plans: dict[tuple[str, str, str, bool], _Plan] = {}

    def budgets(self, org: str, now: float) -> tuple[Budget, ...]:
        """The org's budgets in the calendar windows around `now`; rebuilt once a day."""
        return self._day_budgets(org, now).budgets

    def _day_budgets(self, org: str, now: float) -> _Budgets:
        day_number = int(now // 86_400)
        cached = self._budgets.get(org)
        if cached is None or cached.day_number != day_number:
            caps = self.caps.get(org) or {}
            day, month = day_window(now), month_window(now)
            budgets = tuple(
                Budget(f"org:{org}:{cap}", round(value * MICROS) if cap.startswith("cost") else int(value),
                       day if cap.endswith("day") else month, cap.startswith("cost"))
                for cap, value in caps.items())
            cached = _Budgets(day_number, budgets, tuple(budget_key(org, b) for b in budgets),
                              ", ".join(b.name for b in budgets))
            self._budgets[org] = cached
        return cached

    def _plan(self, org: str, key_id: str, model: str, oip: bool) -> _Plan:
        plan = self._plans.get((org, key_id, model, oip))
        if plan is None:
            rates = (*self.orgs.get(org, ()), *self.keys.get(key_id, ()), *self.org_models.get((org, model), ()))
            if oip:  # no tokens: only request rates apply
                rates = tuple(r for r in rates if not r.tokens)
            plan = self._plans[(org, key_id, model, oip)] = _Plan(
                rates, tuple(rate_key(org, r) for r in rates), ", ".join(r.name for r in rates),
                any(r.tokens for r in rates))
        return plan

    def ask(self, call: Call, now: float) -> tuple[Ask, _Plan, str] | None:
        """What one call asks of the store, its tokens estimated, with its plan and the names of
        its budgets; None when nothing applies."""
        model = call.request.model
        oip = call.protocol == OIP
        plan = self._plan(call.org, call.api_key_id, model, oip)
        day = self._day_budgets(call.org, now) if call.org in self.caps else _NO_BUDGETS
        budgets, budget_keys, budget_detail = day.budgets, day.keys, day.detail
        if oip and budgets:  # no tokens: only cost budgets apply
            kept = [i for i, b in enumerate(budgets) if b.is_cost]
            budgets, budget_keys = tuple(budgets[i] for i in kept), tuple(budget_keys[i] for i in kept)
            budget_detail = ", ".join(b.name for b in budgets)
        if not plan.rates and not budgets:
            return None
        assert call.model is not None
        est_in, est_out = (0, 0) if oip else estimate_tokens(
            call.request.input, call.request.input_bytes,
            call.request.max_output_tokens or call.model.default_max_output_tokens)
        tokens = float(est_in + est_out)
        rate_costs = tuple(tokens if r.tokens else 1.0 for r in plan.rates) if plan.tokens else (1.0,) * len(plan.rates)
        budget_costs: tuple[int, ...] = ()
        if budgets:
            price = self.prices.get(model)
            budget_costs = tuple(cost_micros(price, est_in, est_out, 1) if b.is_cost else est_in + est_out
                                 for b in budgets)
        ask = Ask(call.org, plan.rates, rate_costs, budgets, budget_costs, plan.keys, budget_keys)
        return ask, plan, budget_detail


_NO_BUDGETS = _Budgets(0, (), (), "")


class Limits:
    span_name = "sidecar.limits"  # rate limits and budgets: one store round trip, one span

    def __init__(self, config: Callable[[], Config], store: LimitStore,
                 wall: Callable[[], float] | None = None) -> None:
        self._config = config
        self._store = store
        self._wall = wall or store.wall  # the store's clock: one budget window per moment for every sidecar
        self._tables = PerConfig(LimitTable)
        self._decision_seconds = LIMIT_DECISION_SECONDS.labels(store.name)

    async def __call__(self, call: Call) -> None:
        table = self._tables.get(self._config())
        asked = table.ask(call, self._wall())
        if asked is None:
            return
        ask, plan, budget_names = asked
        started = time.perf_counter()
        verdict = await self._store.admit(ask)
        self._decision_seconds.observe(time.perf_counter() - started)
        if verdict.degraded:
            call.decide("rate_limit", "degraded", "decided locally: the limit store is unavailable")
        for name in verdict.shadow_denied:
            call.decide("rate_limit", "shadow_deny", name)
            RATE_LIMIT_SHADOW_DENIALS.labels(call.org, name).inc()
            log.info("shadow limit would deny", extra={"request_id": call.request_id, "limit": name,
                                                       "org": call.org, "api_key_id": call.api_key_id})
        if not verdict.allowed:
            call.decide("budget" if verdict.over_budget else "rate_limit", "deny", verdict.denied_by)
            raise self._denied(call, ask, verdict)
        call.decide("rate_limit", "allow", plan.detail)
        if ask.budgets:
            call.decide("budget", "allow", budget_names)
        if ask.budgets or plan.tokens:
            call.reservation = Reservation(ask, verdict.degraded, verdict.charged)

    def _denied(self, call: Call, ask: Ask, verdict: Verdict) -> SidecarError:
        if not verdict.over_budget:
            RATE_LIMIT_DENIALS.labels(call.org, verdict.denied_by).inc()
            return rate_limited(verdict.denied_by, verdict.retry_after)
        BUDGET_DENIALS.labels(call.org).inc()
        i = next(i for i, b in enumerate(ask.budgets) if b.name == verdict.denied_by)
        return over_budget(call.org, ask.budgets[i], verdict.budget_used, ask.budget_costs[i])

    def finish(self, call: Call) -> None:
        """Pipeline finisher, run once when the call has ended however it ended: settles its
        reservation to what the call is billed (`billing.bill`: the usage record's numbers)."""
        reservation: Reservation | None = call.reservation
        if reservation is None:
            return
        call.reservation = None
        billed = bill(call)
        used_in, used_out = billed.input_tokens, billed.output_tokens
        ask = reservation.ask
        rate_deltas = tuple(float(used_in + used_out) - units if r.tokens else 0.0
                            for r, units in zip(ask.rates, reservation.charged, strict=True))
        price = self._tables.get(self._config()).prices.get(call.request.model)
        budget_deltas = tuple(
            (cost_micros(price, used_in, used_out, billed.requests) if b.is_cost else used_in + used_out) - cost
            for b, cost in zip(ask.budgets, ask.budget_costs, strict=True))
        if any(rate_deltas) or any(budget_deltas):
            self._store.settle(ask, rate_deltas, budget_deltas, degraded=reservation.degraded)


def rate_limited(limit: str, retry_after: float) -> SidecarError:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1_000_000, int(retry_after * 1e9)))  # at least 1 ms
    return SidecarError("RATE_LIMIT_EXCEEDED", f"rate limit {limit} exceeded; retry in {retry_after:.3f}s",
                        metadata={"limit": limit}, details=[error_details_pb2.RetryInfo(retry_delay=delay)])


def over_budget(org: str, budget: Budget, used: int, cost: int) -> SidecarError:
    resets = datetime.fromtimestamp(budget.window.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    cap = budget.name.rpartition(":")[2]
    description = (f"{cap} budget of {budget.describe(budget.limit)} for window {budget.window.id}: "
                   f"{budget.describe(used)} used, this call needs {budget.describe(cost)}; resets at {resets}")
    violation = error_details_pb2.QuotaFailure.Violation(
        subject=f"org:{org}", description=description, quota_metric=cap, quota_id=budget.name,
        quota_dimensions={"org": org, "window": budget.window.id}, quota_value=budget.limit)
    return SidecarError("BUDGET_EXCEEDED", f"budget {budget.name} exceeded; resets at {resets}",
                        metadata={"budget": budget.name, "window": budget.window.id, "resets_at": resets},
                        details=[error_details_pb2.QuotaFailure(violations=[violation])])
