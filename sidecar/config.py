"""Config: load YAML, substitute `${ENV}`, validate once into an immutable tree.

Called at start and on every reload (in a worker thread, see app.py). A config either validates
completely or is rejected with one `ConfigError` line per problem, each naming its key path
(`models.chat.backends[1].weight: must be >= 0`), so an operator can fix it without guessing.
Unknown keys are errors: a typo must never silently fall back to a default. The file's size,
encoding, nesting, aliases and duplicate keys are checked before anything else (config_yaml.py).

The file `sidecar run --config` names is the *bootstrap*: either the config itself
(`config_source.kind: file`, the default) or, with `config_source.kind: etcd`, only where the
config is kept (`load_bootstrap`); the config in etcd is the same schema, validated by the same
`parse_config` (`remote=True`: without a `config_source` of its own).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any, Generic, TypeVar

from pydantic import Field, ValidationError, model_validator

from sidecar.config_sections import (
    KAFKA_FILE_PROPERTIES,
    MAX_INT32,
    Address,
    AdminTokenConfig,
    ApiKeyConfig,
    AuditConfig,
    AuthConfig,
    BackendConfig,
    BudgetRule,
    BudgetsConfig,
    ClientTlsConfig,
    ConfigSourceConfig,
    EtcdTlsConfig,
    HealthChecksConfig,
    LimitRule,
    LimitsConfig,
    ModelConfig,
    ModelHealthChecksConfig,
    Name,
    OrgLimitRule,
    OutlierDetectionConfig,
    OverridesConfig,
    PathText,
    Price,
    RateRule,
    RetriesConfig,
    Section,
    ServerTlsConfig,
    ShutdownConfig,
    TelemetryConfig,
    TlsConfig,
    UsageConfig,
    UsageKafkaConfig,
)
from sidecar.config_yaml import (
    MAX_CONFIG_BYTES,
    TOO_BIG,
    ConfigError,
    decode,
    key_path,
    load_yaml,
    read_config_text,
)
from sidecar.listener_tls import admin_exposure_problems, server_tls_problems
from sidecar.routing.backend_tls import backend_tls_problems

__all__ = [
    "AdminTokenConfig",
    "ApiKeyConfig",
    "AuditConfig",
    "AuthConfig",
    "BackendConfig",
    "Bootstrap",
    "BudgetRule",
    "BudgetsConfig",
    "ClientTlsConfig",
    "Config",
    "ConfigError",
    "ConfigSourceConfig",
    "EtcdTlsConfig",
    "HealthChecksConfig",
    "LimitRule",
    "LimitsConfig",
    "ModelConfig",
    "ModelHealthChecksConfig",
    "OrgLimitRule",
    "OutlierDetectionConfig",
    "OverridesConfig",
    "PerConfig",
    "Price",
    "RateRule",
    "RetriesConfig",
    "ServerTlsConfig",
    "ShutdownConfig",
    "TelemetryConfig",
    "TlsConfig",
    "UsageConfig",
    "UsageKafkaConfig",
    "config_text",
    "key_path",
    "load_bootstrap",
    "load_config",
    "machine_problems",
    "parse_bootstrap",
    "parse_config",
    "read_config_text",
]

S = TypeVar("S")
T = TypeVar("T")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Config(Section):
    listen: Address = "127.0.0.1:50051"
    admin_listen: Address = "127.0.0.1:50052"
    ops_listen: Address = "127.0.0.1:9464"
    # only grpc.health.v1, always plaintext: for the kubelet's grpc: probes on the pod IP, which
    # cannot speak TLS and cannot reach the loopback listeners. None: no such listener
    health_listen: Address | None = None
    max_message_bytes: int = Field(default=16 * 1024 * 1024, gt=0, le=MAX_INT32)  # gRPC takes an int32
    state_dir: PathText = "./var/state"       # routing overrides survive restarts here
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
    tls: TlsConfig = TlsConfig()               # listeners and backends; none by default
    config_source: ConfigSourceConfig = ConfigSourceConfig()  # kind file here; etcd makes a bootstrap
    models: dict[Name, ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_listeners(self) -> Config:
        listeners = [self.listen, self.admin_listen, self.ops_listen, self.health_listen]
        fixed = [a for a in listeners if a is not None and not a.endswith(":0")]
        if len(set(fixed)) != len(fixed):
            raise ValueError("listen, admin_listen, ops_listen and health_listen must be different addresses")
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
    Files the config names are checked on this machine too (a usage file that cannot be
    written would lose every record). A bootstrap of an etcd source holds no config:
    `ConfigError` saying where it is (`run` and `check-config` take either: `load_bootstrap`)."""
    bootstrap = load_bootstrap(path, environ)
    if bootstrap.config is None:
        raise ConfigError([(f"config_source.kind: {path} is a bootstrap: the config is kept in etcd key "
                           f"{bootstrap.source.key} (`sidecar config get --config {path}` shows it)")])
    return bootstrap.config


@dataclass(frozen=True)
class Bootstrap:
    """What `sidecar run --config FILE` starts from: the config itself (`config_source.kind:
    file`: `config` and its `text`), or only where it is kept (`etcd`: `source`; config None)."""

    source: ConfigSourceConfig
    config: Config | None = None
    text: str = ""


def load_bootstrap(path: str | Path, environ: Mapping[str, str] | None = None) -> Bootstrap:
    """`parse_bootstrap` of the file at `path`, and the paths it names checked on this machine."""
    text = read_config_text(path)
    bootstrap = parse_bootstrap(text, environ)
    problems = machine_problems(bootstrap.config) if bootstrap.config else source_problems(bootstrap.source)
    if problems:
        raise ConfigError(problems)
    return bootstrap


def parse_bootstrap(text: str, environ: Mapping[str, str] | None = None) -> Bootstrap:
    """A config (`config_source.kind: file`, or no `config_source`), or a bootstrap of an etcd
    source: a file with `config_source` and nothing else. `ConfigError` otherwise."""
    data = _data(text, environ)
    source = data.get("config_source")
    if not (isinstance(source, dict) and source.get("kind") == "etcd"):
        config = _validate(data)
        return Bootstrap(config.config_source, config, text)
    problems = [f"{key_path([key])}: not in a bootstrap: with config_source.kind etcd the config is kept in "
                "etcd, and this file holds config_source only" for key in data if key != "config_source"]
    try:
        checked = _BootstrapFile.model_validate({"config_source": source})
    except ValidationError as exc:
        raise ConfigError([*problems, *(_describe(err) for err in exc.errors())]) from None
    problems += _source_problems(checked.config_source, set(source))
    if problems:
        raise ConfigError(problems)
    return Bootstrap(checked.config_source)


class _BootstrapFile(Section):
    config_source: ConfigSourceConfig


def source_problems(source: ConfigSourceConfig) -> list[str]:
    """The files an etcd source names, checked on this machine without creating anything: the
    cache must be writable (a start while etcd is down needs it), TLS files readable."""
    problems = []
    problem = unwritable(Path(source.cache_file))
    if problem:
        problems.append(f"config_source.cache_file: cannot be written: {problem}")
    tls = source.tls
    files = [("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)] if tls else []
    problems += [f"config_source.tls.{name}: cannot be read: {file}" for name, file in files
                 if file is not None and not os.access(file, os.R_OK)]
    return problems


def _source_problems(source: ConfigSourceConfig, given: set[str]) -> list[str]:
    """What `kind` asks of the other keys: etcd needs endpoints, credentials come in pairs;
    `file` takes none of them (a config never appears to do what it does not)."""
    if source.kind == "file":
        return [f"config_source.{key}: only with kind etcd" for key in sorted(given - {"kind"}, key=str)]
    problems = []
    if not source.endpoints:
        problems.append("config_source.endpoints: required with kind etcd (host:port of each etcd member)")
    if (source.username is None) != (source.password is None):
        missing = "password" if source.password is None else "username"
        problems.append(f"config_source.{missing}: username and password go together")
    return problems


def config_text(data: bytes, where: str) -> str:
    """The text of a config that is not a file (an etcd value), within the bounds of a file."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{where}: {TOO_BIG}"])
    return decode(data)


def machine_problems(config: Config) -> list[str]:
    """Paths the sidecar must be able to write (relative ones from the current directory),
    checked without creating anything, and the files of its TLS clients it must read, and the
    certificates of its TLS listeners it will serve (read and checked: listener_tls.py), and the
    backends' TLS files (read and checked: routing/backend_tls.py)."""
    return (_unwritable_paths(config) + client_file_problems(config) + server_tls_problems(config.tls)
            + backend_tls_problems(config))


def client_file_problems(config: Config) -> list[str]:
    """The PEM files of Redis's and the collector's TLS read and checked (the CA parses, the key
    is the certificate's, not encrypted: tls_client.py), and the files librdkafka properties name
    (`ssl.ca.location`, ...) readable: a start is refused, naming the key, rather than running
    with a store, exporter or producer that can never connect. Rotation replaces them later
    (docs/configuration.md, "TLS to Redis, the collector and Kafka")."""
    from sidecar.tls_client import TlsFilesError, read_credentials

    problems = []
    for prefix, tls in (("limits.redis_tls", config.limits.redis_tls), ("telemetry.otlp_tls", config.telemetry.otlp_tls)):
        try:
            if tls is not None:
                read_credentials(tls)
        except TlsFilesError as exc:
            problems += [f"{prefix}.{key}: {message}" for key, message in exc.problems]
    if config.usage.sink == "kafka":
        properties = config.usage.kafka.properties
        files = [(name, str(properties[name])) for name in KAFKA_FILE_PROPERTIES
                 if name in properties and not (name == "ssl.ca.location" and properties[name] == "probe")]
        problems += [f"usage.kafka.properties.{name}: cannot be read: {path}" for name, path in files
                     if not os.access(path, os.R_OK)]
    return problems


def _unwritable_paths(config: Config) -> list[str]:
    usage = config.usage
    if usage.sink == "file":
        problem = unwritable(Path(usage.file.path))
        return [f"usage.file.path: cannot be written: {problem}"] if problem else []
    if usage.sink == "kafka":
        problem = unusable_dir(Path(usage.spool_dir))
        return [f"usage.spool_dir: cannot be used: {problem}"] if problem else []
    return []


def _stat(path: Path) -> os.stat_result | None:
    """None when nothing is there (or it cannot be looked at: `_creatable` then says why)."""
    try:
        return path.stat()
    except OSError:
        return None


def _creatable(path: Path, what: str) -> str:
    """Why `path`, which does not exist, cannot be created ("" when it can): its nearest
    existing ancestor must be a directory we may write in."""
    parent = path.parent
    while _stat(parent) is None and parent != parent.parent:
        parent = parent.parent
    stat = _stat(parent)
    if stat is None or not S_ISDIR(stat.st_mode):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {what} in {parent}"
    return ""


def unwritable(path: Path) -> str:
    """Why a file at `path` cannot be created or appended to ("" when it can); creates nothing."""
    stat = _stat(path)
    if stat is None:
        return _creatable(path, "files")
    if S_ISDIR(stat.st_mode):
        return f"{path} is a directory"
    return "" if os.access(path, os.W_OK) else f"{path} is not writable"


def unusable_dir(path: Path) -> str:
    """Why `path` cannot be (created as) a directory the sidecar writes in ("" when it can)."""
    stat = _stat(path)
    if stat is None:
        return _creatable(path, "directories")
    if not S_ISDIR(stat.st_mode):
        return f"{path} is not a directory"
    return "" if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"


def parse_config(text: str, environ: Mapping[str, str] | None = None, *, remote: bool = False) -> Config:
    """Validates a config's text (at most 1 MiB of YAML, see config_yaml.py); raises
    `ConfigError` listing every problem. Touches nothing on this machine. `remote`: the config
    kept in etcd, which may not say where configs come from (each sidecar's bootstrap does)."""
    data = _data(text, environ)
    if remote and "config_source" in data:
        raise ConfigError([("config_source: not in a config kept in etcd: it belongs in each sidecar's "
                           "bootstrap file (`sidecar run --config`)")])
    source = data.get("config_source")
    if isinstance(source, dict) and source.get("kind") == "etcd":
        raise ConfigError([("config_source.kind: etcd makes this file a bootstrap, read once at start by "
                           "`sidecar run`; it holds no config")])
    return _validate(data)


def _data(text: str, environ: Mapping[str, str] | None) -> dict[str, Any]:
    """The YAML mapping of `text`, `${ENV}` substituted."""
    raw = load_yaml(text)
    if not isinstance(raw, dict):
        raise ConfigError(["(root): must be a mapping of keys to values"])
    env = os.environ if environ is None else environ
    problems: list[str] = []
    data: dict[str, Any] = _substitute(raw, (), env, problems)
    if problems:
        raise ConfigError(problems)
    return data


def _validate(data: dict[str, Any]) -> Config:
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(err) for err in exc.errors()) from None
    given = data.get("config_source")
    problems = _cross_check(config) + _source_problems(config.config_source, set(given or ()))
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
    problems += admin_exposure_problems(config.admin_listen, config.tls)  # the loopback rule
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
                problems: list[str], budget: list[int] | None = None) -> Any:
    """Replaces `${VAR}` / `${VAR:-default}` in every string scalar, reporting unset variables.
    What the substitutions add together is bounded like the file (`budget`: bytes left), so a
    reference repeated many times cannot blow a small file up."""
    budget = [MAX_CONFIG_BYTES] if budget is None else budget
    if isinstance(node, dict):
        return {k: _substitute(v, (*path, str(k)), env, problems, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, (*path, i), env, problems, budget) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = env.get(name, default)
        if value is None:
            problems.append(f"{key_path(path)}: environment variable {name} is not set")
            return ""
        budget[0] -= len(value)
        if budget[0] < 0:
            message = f"environment variables substituted make the config larger than {MAX_CONFIG_BYTES} bytes"
            raise ConfigError([f"{key_path(path)}: {message}"])
        return value

    return _ENV_REF.sub(replace, node)


_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown key",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "finite_number": "must be a finite number",
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
