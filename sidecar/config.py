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
from typing import Any, Generic, TypeVar

import yaml
from pydantic import Field, ValidationError, model_validator

from sidecar.config_sections import (
    Address,
    AdminTokenConfig,
    ApiKeyConfig,
    AuditConfig,
    AuthConfig,
    BackendConfig,
    BudgetRule,
    BudgetsConfig,
    HealthChecksConfig,
    LimitRule,
    LimitsConfig,
    ModelConfig,
    Name,
    OrgLimitRule,
    OutlierDetectionConfig,
    OverridesConfig,
    Price,
    RateRule,
    RetriesConfig,
    Section,
    ShutdownConfig,
    TelemetryConfig,
    UsageConfig,
    UsageKafkaConfig,
)

__all__ = [
    "AdminTokenConfig",
    "ApiKeyConfig",
    "AuditConfig",
    "AuthConfig",
    "BackendConfig",
    "BudgetRule",
    "BudgetsConfig",
    "Config",
    "ConfigError",
    "HealthChecksConfig",
    "LimitRule",
    "LimitsConfig",
    "ModelConfig",
    "OrgLimitRule",
    "OutlierDetectionConfig",
    "OverridesConfig",
    "PerConfig",
    "Price",
    "RateRule",
    "RetriesConfig",
    "ShutdownConfig",
    "TelemetryConfig",
    "UsageConfig",
    "UsageKafkaConfig",
    "key_path",
    "load_config",
    "parse_config",
]

S = TypeVar("S")
T = TypeVar("T")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config that must not be used. `problems` holds one `key.path: message` line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class Config(Section):
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
    usage: UsageConfig = UsageConfig()
    audit: AuditConfig = AuditConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
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
    """Reads, substitutes and validates `path`; raises `ConfigError` listing every problem.
    For `check-config` and `run`, files the config names are checked on this machine too (a
    usage file that cannot be written would lose every record)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    config = parse_config(text, environ)
    problems = _machine_problems(config)
    if problems:
        raise ConfigError(problems)
    return config


def _machine_problems(config: Config) -> list[str]:
    """Paths the sidecar must be able to write (relative ones from the current directory)."""
    if config.usage.sink != "file":
        return []
    problem = unwritable(Path(config.usage.file.path))
    return [f"usage.file.path: cannot be written: {problem}"] if problem else []


def unwritable(path: Path) -> str:
    """Why a file at `path` cannot be created or appended to ("" when it can); creates nothing."""
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists():
        return "" if os.access(path, os.W_OK) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create files in {parent}"
    return ""


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
    if config.audit.store == "redis" and not config.limits.redis_url:
        problems.append("audit.store: redis needs limits.redis_url")
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
