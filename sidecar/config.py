"""Config: load YAML, substitute `${ENV}`, validate once into an immutable tree.

Called at start and on every reload. A config either validates completely or is rejected with
one `ConfigError` line per problem, each naming its key path
(`models.chat.backends[1].weight: must be >= 0`), so an operator can fix it without guessing.
Unknown keys are errors: a typo must never silently fall back to a default.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

S = TypeVar("S")
T = TypeVar("T")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHA256 = re.compile(r"^(sha256:)?([0-9a-fA-F]{64})$")


class ConfigError(Exception):
    """A config that must not be used. `problems` holds one `key.path: message` line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def _address(value: str) -> str:
    """`host:port` (IPv6 hosts in brackets); port 0 asks the OS for a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be host:port with a port from 0 to 65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError("an IPv6 host must be in brackets, e.g. [::1]:50051")
    return value


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must start with a letter or digit and use only letters, digits, '_', '.', '-'")
    return value


def _sha256(value: str) -> str:
    """`sha256:<hex>` (as `sidecar hash-key` prints it) or bare hex -> lower-case hex."""
    match = _SHA256.match(value.strip())
    if match is None:
        raise ValueError("must be a SHA-256 hex digest (64 hex digits, optionally prefixed 'sha256:'); "
                         "make one with `sidecar hash-key KEY`")
    return match.group(2).lower()


def _redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return value


Address = Annotated[str, AfterValidator(_address)]
RedisUrl = Annotated[str, AfterValidator(_redis_url)]
Sha256 = Annotated[str, AfterValidator(_sha256)]
Name = Annotated[str, AfterValidator(_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Section):
    name: Name
    address: Address
    weight: float = Field(default=1.0, ge=0)
    priority: int = Field(default=0, ge=0)
    max_in_flight: int | None = Field(default=None, ge=1)  # calls at once; a full backend is skipped


class ModelConfig(_Section):
    timeout_ms: int = Field(default=30_000, gt=0)
    # what a call reserves for its output when the request sets no max_output_tokens (token
    # limits and budgets reserve before the call and settle to the real usage after)
    default_max_output_tokens: int = Field(default=1024, ge=1)
    # weighted_random; or p2c_ewma: two weighted draws, the lower peak-EWMA latency x (in flight + 1) wins
    balancer: Literal["weighted_random", "p2c_ewma"] = "weighted_random"
    # session: calls with the same session_id go to the same backend (consistent hashing, bounded load)
    affinity: Literal["none", "session"] = "none"
    backends: list[BackendConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_backend_names(self) -> ModelConfig:
        seen: set[str] = set()
        for backend in self.backends:
            if backend.name in seen:
                raise ValueError(f"backend name {backend.name!r} is used twice")
            seen.add(backend.name)
        return self


class ApiKeyConfig(_Section):
    id: Name                                  # appears in logs, metrics, usage records; the key never does
    sha256: Sha256
    org: Name
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)  # glob patterns


class AdminTokenConfig(_Section):
    id: Name                                  # logged for admin calls; the token never is
    sha256: Sha256


class AuthConfig(_Section):
    api_keys: list[ApiKeyConfig] = Field(min_length=1)
    admin_tokens: list[AdminTokenConfig] = Field(default_factory=list)


class RateRule(_Section):
    """Request and token rates; each burst defaults to one minute's amount."""

    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)        # requests admitted at once from idle
    token_burst: int | None = Field(default=None, ge=1)  # tokens admitted at once from idle
    shadow: bool = False                                 # count and report, never deny

    def _check_rates(self, required: bool) -> None:
        if required and self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("needs requests_per_minute or tokens_per_minute")
        if self.burst is not None and self.requests_per_minute is None:
            raise ValueError("burst needs requests_per_minute")
        if self.token_burst is not None and self.tokens_per_minute is None:
            raise ValueError("token_burst needs tokens_per_minute")


class LimitRule(RateRule):
    """The rates of one API key, or of one org on one model."""

    @model_validator(mode="after")
    def _has_a_rate(self) -> LimitRule:
        self._check_rates(required=True)
        return self


class OrgLimitRule(RateRule):
    """The rates of every key of one org together, and optionally per model."""

    models: dict[Name, LimitRule] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_a_rate(self) -> OrgLimitRule:
        self._check_rates(required=not self.models)
        return self


class LimitsConfig(_Section):
    store: Literal["memory", "redis"] = "memory"
    redis_url: RedisUrl | None = None
    # connect and reply timeout of one store call; above a CFS throttling period (100 ms), so a
    # CPU-limited pod's stall does not count as a dead store
    redis_timeout_ms: int = Field(default=250, gt=0)
    on_store_error: Literal["allow", "deny"] = "allow"
    expected_replicas: int = Field(default=1, ge=1)        # with allow: each sidecar takes 1/n locally
    breaker_failures: int = Field(default=3, ge=1)         # consecutive store errors that open the breaker
    breaker_cooldown_ms: int = Field(default=1_000, gt=0)  # how often an open breaker probes the store
    orgs: dict[Name, OrgLimitRule] = Field(default_factory=dict)
    api_keys: dict[Name, LimitRule] = Field(default_factory=dict)  # by api key id



class BudgetRule(_Section):
    """Spending caps of one org over UTC calendar windows: tokens, and cost from model prices."""

    tokens_per_day: int | None = Field(default=None, ge=1)
    tokens_per_month: int | None = Field(default=None, ge=1)
    cost_per_day: float | None = Field(default=None, gt=0)
    cost_per_month: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _has_a_cap(self) -> BudgetRule:
        if not self.caps():
            raise ValueError("needs tokens_per_day, tokens_per_month, cost_per_day or cost_per_month")
        return self

    def caps(self) -> dict[str, float]:
        return {name: value for name, value in (("tokens_per_day", self.tokens_per_day),
                                                ("tokens_per_month", self.tokens_per_month),
                                                ("cost_per_day", self.cost_per_day),
                                                ("cost_per_month", self.cost_per_month)) if value is not None}


class Price(_Section):
    input_per_1k: float = Field(ge=0)   # cost of 1000 input tokens, in the unit of the cost budgets
    output_per_1k: float = Field(ge=0)


class BudgetsConfig(_Section):
    orgs: dict[Name, BudgetRule] = Field(default_factory=dict)
    prices: dict[Name, Price] = Field(default_factory=dict)  # by model


class HealthChecksConfig(_Section):
    """Active grpc.health.v1 checks of every backend address."""

    enabled: bool = True
    interval_ms: int = Field(default=2_000, gt=0)
    timeout_ms: int = Field(default=500, gt=0)
    unhealthy_threshold: int = Field(default=3, ge=1)  # consecutive failed checks that mark it unhealthy
    healthy_threshold: int = Field(default=2, ge=1)    # consecutive passed checks that mark it healthy again
    service: str = ""                                  # the health service name asked of backends

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthChecksConfig:
        if self.timeout_ms > self.interval_ms:
            raise ValueError("timeout_ms must be <= interval_ms")
        return self


class OutlierDetectionConfig(_Section):
    """Passive ejection of backends whose real calls keep failing."""

    consecutive_failures: int = Field(default=5, ge=1)
    base_ejection_ms: int = Field(default=30_000, gt=0)    # times the number of ejections so far
    max_ejection_ms: int = Field(default=300_000, gt=0)
    max_ejection_percent: int = Field(default=50, ge=0, le=100)  # of a model's backends (one always may go)


RetryableCode = Literal["UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"]


class RetriesConfig(_Section):
    """Retrying a failed attempt on another backend, before anything reached the caller."""

    max_attempts: int = Field(default=2, ge=1)            # 1 = never retry
    retry_on: list[RetryableCode] = Field(default_factory=lambda: list[RetryableCode](["UNAVAILABLE"]))
    budget_percent: float = Field(default=20.0, ge=0, le=100)  # retries <= this share of recent calls
    min_retries_per_second: float = Field(default=3.0, ge=0)   # ... but at least this many


class OverridesConfig(_Section):
    """Where operator routing overrides are kept (see routing/overrides.py)."""

    store: Literal["file", "redis"] = "file"          # file: state_dir; redis: limits.redis_url, shared
    sync_interval_ms: int = Field(default=1_000, gt=0)  # redis: how soon other sidecars' changes apply


class ShutdownConfig(_Section):
    grace_ms: int = Field(default=15_000, ge=0)  # in-flight calls get this long after SIGTERM


class Config(_Section):
    listen: Address = "127.0.0.1:50051"
    admin_listen: Address = "127.0.0.1:50052"
    ops_listen: Address = "127.0.0.1:9464"
    max_message_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    state_dir: str = "./var/state"            # routing overrides survive restarts here
    shutdown: ShutdownConfig = ShutdownConfig()
    auth: AuthConfig | None = None            # None: every caller is accepted (see docs)
    limits: LimitsConfig = LimitsConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    health_checks: HealthChecksConfig = HealthChecksConfig()
    outlier_detection: OutlierDetectionConfig = OutlierDetectionConfig()
    retries: RetriesConfig = RetriesConfig()
    overrides: OverridesConfig = OverridesConfig()
    models: dict[Name, ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_listeners(self) -> Config:
        listeners = [self.listen, self.admin_listen, self.ops_listen]
        fixed = [a for a in listeners if not a.endswith(":0")]
        if len(set(fixed)) != len(fixed):
            raise ValueError("listen, admin_listen and ops_listen must be different addresses")
        return self


class PerConfig(Generic[S, T]):
    """A value derived from a config section (a lookup table, compiled patterns), built once.

    Stages read the config in force on every call; this rebuilds the derived value only when
    the section object changes, i.e. after a reload. Holding the section keeps `is` exact.
    """

    def __init__(self, build: Callable[[S], T]) -> None:
        self._build = build
        self._current: tuple[S, T] | None = None

    def get(self, section: S) -> T:
        if self._current is None or self._current[0] is not section:
            self._current = (section, self._build(section))
        return self._current[1]


# --- loading -------------------------------------------------------------------------------


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Reads, substitutes and validates `path`; raises `ConfigError` listing every problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse_config(text, environ)


def parse_config(text: str, environ: Mapping[str, str] | None = None) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"(root): invalid YAML{where}: {problem}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(["(root): must be a mapping of keys to values"])
    env = os.environ if environ is None else environ
    problems: list[str] = []
    data = _substitute(raw, (), env, problems)
    if problems:
        raise ConfigError(problems)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(err) for err in exc.errors()) from None
    problems = _cross_check(config)
    if problems:
        raise ConfigError(problems)
    return config


def _auth_problems(auth: AuthConfig) -> list[str]:
    """Ids and digests are unique among keys and tokens; an admin token is never an API key."""
    problems = []
    for kind, path, items in (("api key", "auth.api_keys", [(k.id, k.sha256) for k in auth.api_keys]),
                              ("admin token", "auth.admin_tokens", [(t.id, t.sha256) for t in auth.admin_tokens])):
        ids: dict[str, int] = {}
        digests: dict[str, int] = {}
        for i, (name, digest) in enumerate(items):
            if name in ids:
                problems.append(f"{path}[{i}].id: {kind} id {name!r} is used twice (also {path}[{ids[name]}])")
            if digest in digests:
                problems.append(f"{path}[{i}].sha256: the same digest as {path}[{digests[digest]}]")
            ids.setdefault(name, i)
            digests.setdefault(digest, i)
    api_digests = {k.sha256: i for i, k in enumerate(auth.api_keys)}
    problems += [f"auth.admin_tokens[{i}].sha256: the same digest as auth.api_keys[{api_digests[t.sha256]}]; "
                 "use separate secrets" for i, t in enumerate(auth.admin_tokens) if t.sha256 in api_digests]
    return problems


def _cross_check(config: Config) -> list[str]:
    """References between sections: a limit or budget must name an org, key or model that exists."""
    keys = config.auth.api_keys if config.auth else []
    orgs = {k.org for k in keys} if config.auth else {"anonymous"}
    known = ", ".join(sorted(orgs))
    problems = _auth_problems(config.auth) if config.auth else []
    problems += [f"limits.orgs.{org}: no caller has this org (orgs: {known})"
                for org in config.limits.orgs if org not in orgs]
    ids = {k.id for k in keys}
    problems += [f"limits.api_keys.{key}: no api key with this id in auth.api_keys"
                 for key in config.limits.api_keys if key not in ids]
    if config.limits.store == "redis" and not config.limits.redis_url:
        problems.append("limits.redis_url: required when limits.store is redis")
    if config.overrides.store == "redis" and not config.limits.redis_url:
        problems.append("overrides.store: redis needs limits.redis_url")
    problems += [f"limits.orgs.{org}.models.{model}: no such model in models"
                 for org, rule in config.limits.orgs.items() for model in rule.models if model not in config.models]
    problems += [f"budgets.orgs.{org}: no caller has this org (orgs: {known})"
                 for org in config.budgets.orgs if org not in orgs]
    problems += [f"budgets.prices.{model}: no such model in models"
                 for model in config.budgets.prices if model not in config.models]
    unpriced = sorted(m for m in config.models if m not in config.budgets.prices)
    for org, rule in config.budgets.orgs.items():
        for cap in ("cost_per_day", "cost_per_month"):
            if cap in rule.caps() and unpriced:
                problems.append(f"budgets.orgs.{org}.{cap}: models without a price in budgets.prices: "
                                f"{', '.join(unpriced)}")
    return problems


def _substitute(node: Any, path: tuple[str | int, ...], env: Mapping[str, str],
                problems: list[str]) -> Any:
    """Replaces `${VAR}` / `${VAR:-default}` in every string scalar, reporting unset variables."""
    if isinstance(node, dict):
        return {k: _substitute(v, (*path, str(k)), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, (*path, i), env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{key_path(path)}: environment variable {name} is not set")
        return ""

    return _ENV_REF.sub(replace, node)


def key_path(loc: Iterable[str | int]) -> str:
    """('models', 'chat', 'backends', 1, 'weight') -> 'models.chat.backends[1].weight'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown key",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "literal_error": "must be one of {expected}",
}


def _plain(value: Any) -> Any:
    """2.0 -> 2, so messages read `must be >= 0` rather than `>= 0.0`."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _describe(error: Mapping[str, Any]) -> str:
    loc = [p for p in error["loc"] if p not in ("[key]",)]
    kind = error["type"]
    template = _MESSAGES.get(kind)
    if template is not None:
        ctx = {k: _plain(v) for k, v in error.get("ctx", {}).items()}
        message = template.format(**ctx)
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
    return f"{key_path(loc)}: {message}"
