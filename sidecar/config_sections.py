"""The config's sections: one immutable pydantic model per YAML mapping, built from the value
types and bounds of config_values.py. `config.py` assembles them into `Config`, loads and
cross-checks; every other module imports them from there.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from sidecar.config_values import (
    MAX_AMOUNT,
    MAX_COUNT,
    MAX_DISK_BYTES,
    MAX_INT32,
    MAX_MS,
    MAX_SECONDS,
    MAX_WEIGHT,
    Address,
    KafkaValue,
    Name,
    OtlpEndpoint,
    PathText,
    RedisUrl,
    Section,
    Sha256,
)

__all__ = [  # with the bounds and value types, re-exported for config.py and the runtime
    "KAFKA_FILE_PROPERTIES",
    "KAFKA_OWNED_PROPERTIES",
    "MAX_AMOUNT",
    "MAX_COUNT",
    "MAX_DISK_BYTES",
    "MAX_INT32",
    "MAX_MS",
    "MAX_SECONDS",
    "MAX_WEIGHT",
    "Address",
    "AdminTokenConfig",
    "ApiKeyConfig",
    "AuditConfig",
    "AuthConfig",
    "BackendConfig",
    "BackendTlsConfig",
    "BudgetRule",
    "BudgetsConfig",
    "ConfigSourceConfig",
    "EtcdTlsConfig",
    "HealthChecksConfig",
    "LimitRule",
    "LimitsConfig",
    "ModelConfig",
    "ModelHealthChecksConfig",
    "Name",
    "OrgLimitRule",
    "OutlierDetectionConfig",
    "OverridesConfig",
    "PathText",
    "Price",
    "RateRule",
    "RedisUrl",
    "RetriesConfig",
    "RetryableCode",
    "Section",
    "Sha256",
    "ShutdownConfig",
    "TelemetryConfig",
    "UsageConfig",
    "UsageFileConfig",
    "UsageKafkaConfig",
]


class ClientTlsConfig(Section):
    """TLS to a server the sidecar calls (a backend, Redis, the OTLP collector): the CA that signed
    its certificate (none: the system's roots), a client certificate when it asks for one (mutual
    TLS), and the name to verify and send as SNI when it is not the address's host. PEM files."""

    ca_file: PathText | None = None
    cert_file: PathText | None = None
    key_file: PathText | None = None
    server_name: str | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> ClientTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class BackendTlsConfig(ClientTlsConfig):
    """A model's or one backend's own TLS to its backends. It replaces the default above it as a
    whole (keys are not merged); `plaintext: true`, or `tls: false`, opts out of a default."""

    plaintext: bool = False

    @model_validator(mode="after")
    def _plaintext_alone(self) -> BackendTlsConfig:
        if self.plaintext and any(getattr(self, key) is not None for key in ClientTlsConfig.model_fields):
            raise ValueError("plaintext: true takes no other key")
        return self


def _false_is_plaintext(value: object) -> object:
    """`tls: false` is short for `tls: {plaintext: true}`."""
    if value is False:
        return {"plaintext": True}
    if value is True:
        raise ValueError("must be a mapping (ca_file, cert_file, key_file, server_name), or false for plaintext")
    return value


BackendTls = Annotated[BackendTlsConfig | None, BeforeValidator(_false_is_plaintext)]


class BackendConfig(Section):
    name: Name
    address: Address
    weight: float = Field(default=1.0, ge=0, le=MAX_WEIGHT)
    priority: int = Field(default=0, ge=0, le=MAX_COUNT)
    max_in_flight: int | None = Field(default=None, ge=1, le=MAX_COUNT)  # calls at once; a full backend is skipped
    tls: BackendTls = None  # this backend's own; else the model's, else tls.backends (routing/backend_tls.py)


class ModelHealthChecksConfig(Section):
    """How the active health checks ask this model's backends (see routing/health_checks.py)."""

    # grpc_health: grpc.health.v1.Health/Check (service: health_checks.service), what Triton and
    # our backends serve; oip_model_ready: inference.GRPCInferenceService/ModelReady(this model's
    # name), for OIP runtimes without grpc health (MLServer and others); needs protocol: oip
    method: Literal["grpc_health", "oip_model_ready"] = "grpc_health"


DEFAULT_PREFIX_BYTES = 256   # affinity: prefix hashes this much of the input by default
MAX_PREFIX_BYTES = 65_536    # a prefix longer than this is a whole document, not a shared prompt


class ModelConfig(Section):
    # the protocol its backends speak, and callers must use: inference_v1 (inference.v1.Inference)
    # or oip (the Open Inference Protocol, KServe v2: inference.GRPCInferenceService)
    protocol: Literal["inference_v1", "oip"] = "inference_v1"
    health_checks: ModelHealthChecksConfig = ModelHealthChecksConfig()
    timeout_ms: int = Field(default=30_000, gt=0, le=MAX_MS)
    # what a call reserves for its output when the request sets no max_output_tokens (token
    # limits and budgets reserve before the call and settle to the real usage after)
    default_max_output_tokens: int = Field(default=1024, ge=1, le=MAX_AMOUNT)
    # usage a backend reports beyond these per call is clamped to them, counted and flagged
    # (billing.py); by default one token per input byte + 4096, and the request's
    # max_output_tokens (32768 when it sets none)
    max_reported_input_tokens: int | None = Field(default=None, ge=1, le=MAX_AMOUNT)
    max_reported_output_tokens: int | None = Field(default=None, ge=1, le=MAX_AMOUNT)
    # weighted_random; or p2c_ewma: two weighted draws, the lower peak-EWMA latency x (in flight + 1) wins
    balancer: Literal["weighted_random", "p2c_ewma"] = "weighted_random"
    # session: calls with the same session_id go to the same backend (consistent hashing, bounded
    # load); prefix: calls whose input starts with the same prefix_bytes bytes do (a backend's
    # prefix / KV cache then serves the shared system prompt again)
    affinity: Literal["none", "session", "prefix"] = "none"
    prefix_bytes: int = Field(default=DEFAULT_PREFIX_BYTES, ge=1, le=MAX_PREFIX_BYTES)  # only with affinity: prefix
    tls: BackendTls = None  # the default of this model's backends, instead of tls.backends
    backends: list[BackendConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_backend_names(self) -> ModelConfig:
        seen: set[str] = set()
        for backend in self.backends:
            if backend.name in seen:
                raise ValueError(f"backend name {backend.name!r} is used twice")
            seen.add(backend.name)
        return self

    @field_validator("affinity")
    @classmethod
    def _prefix_needs_text(cls, affinity: str, info: ValidationInfo) -> str:
        if affinity == "prefix" and info.data.get("protocol") == "oip":
            raise ValueError("prefix needs protocol: inference_v1; OIP inputs are tensors, relayed "
                             "without being read")
        return affinity

    @field_validator("prefix_bytes")
    @classmethod
    def _prefix_bytes_needs_prefix(cls, prefix_bytes: int, info: ValidationInfo) -> int:
        # runs only when the key is given: a prefix_bytes that nothing reads is a mistake to name
        affinity = info.data.get("affinity")
        if affinity is not None and affinity != "prefix":
            raise ValueError(f"only with affinity: prefix (affinity is {affinity})")
        return prefix_bytes

    @model_validator(mode="after")
    def _model_ready_needs_oip(self) -> ModelConfig:
        if self.health_checks.method == "oip_model_ready" and self.protocol != "oip":
            raise ValueError("health_checks.method oip_model_ready needs protocol: oip")
        return self


class ApiKeyConfig(Section):
    id: Name                                  # appears in logs, metrics, usage records; the key never does
    sha256: Sha256
    org: Name
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1)  # glob patterns


class AdminTokenConfig(Section):
    id: Name                                  # logged for admin calls; the token never is
    sha256: Sha256


class AuthConfig(Section):
    api_keys: list[ApiKeyConfig] = Field(min_length=1)
    admin_tokens: list[AdminTokenConfig] = Field(default_factory=list)


class RateRule(Section):
    """Request and token rates; each burst defaults to one minute's amount."""

    requests_per_minute: float | None = Field(default=None, gt=0, le=MAX_AMOUNT)
    tokens_per_minute: float | None = Field(default=None, gt=0, le=MAX_AMOUNT)
    burst: int | None = Field(default=None, ge=1, le=MAX_AMOUNT)        # requests admitted at once from idle
    token_burst: int | None = Field(default=None, ge=1, le=MAX_AMOUNT)  # tokens admitted at once from idle
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


class LimitsConfig(Section):
    store: Literal["memory", "redis"] = "memory"
    redis_url: RedisUrl | None = None
    # with a rediss:// or rediss+cluster:// URL: the CA, a client certificate, the name to verify
    redis_tls: ClientTlsConfig | None = None
    # connect and reply timeout of one store call; above a CFS throttling period (100 ms), so a
    # CPU-limited pod's stall does not count as a dead store
    redis_timeout_ms: int = Field(default=250, gt=0, le=MAX_MS)
    on_store_error: Literal["allow", "deny"] = "allow"
    expected_replicas: int = Field(default=1, ge=1, le=MAX_COUNT)     # with allow: each sidecar takes 1/n locally
    breaker_failures: int = Field(default=3, ge=1, le=MAX_COUNT)      # consecutive store errors that open the breaker
    breaker_cooldown_ms: int = Field(default=1_000, gt=0, le=MAX_MS)  # how often an open breaker probes the store
    orgs: dict[Name, OrgLimitRule] = Field(default_factory=dict)
    api_keys: dict[Name, LimitRule] = Field(default_factory=dict)  # by api key id

    @field_validator("redis_tls")
    @classmethod
    def _tls_needs_a_tls_url(cls, tls: ClientTlsConfig | None, info: ValidationInfo) -> ClientTlsConfig | None:
        url = info.data.get("redis_url")
        if tls is not None and url is not None and not url.startswith(("rediss://", "rediss+cluster://")):
            raise ValueError("only with a TLS redis_url (rediss:// or rediss+cluster://); "
                             f"{url.split('://', 1)[0]}:// is plaintext")
        return tls


class BudgetRule(Section):
    """Spending caps of one org over UTC calendar windows: tokens, and cost from model prices."""

    tokens_per_day: int | None = Field(default=None, ge=1, le=MAX_AMOUNT)
    tokens_per_month: int | None = Field(default=None, ge=1, le=MAX_AMOUNT)
    cost_per_day: float | None = Field(default=None, gt=0, le=MAX_AMOUNT)
    cost_per_month: float | None = Field(default=None, gt=0, le=MAX_AMOUNT)

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


class Price(Section):
    input_per_1k: float = Field(default=0.0, ge=0, le=MAX_AMOUNT)  # cost of 1000 input tokens, in the unit of the cost budgets
    output_per_1k: float = Field(default=0.0, ge=0, le=MAX_AMOUNT)
    # cost of one call a backend worked on, whatever its tokens: the price of OIP calls, which
    # carry no token usage (docs/configuration.md, "Budgets")
    per_request: float = Field(default=0.0, ge=0, le=MAX_AMOUNT)


class BudgetsConfig(Section):
    orgs: dict[Name, BudgetRule] = Field(default_factory=dict)
    prices: dict[Name, Price] = Field(default_factory=dict)  # by model


class HealthChecksConfig(Section):
    """Active grpc.health.v1 checks of every backend address."""

    enabled: bool = True
    interval_ms: int = Field(default=2_000, gt=0, le=MAX_MS)
    timeout_ms: int = Field(default=500, gt=0, le=MAX_MS)
    unhealthy_threshold: int = Field(default=3, ge=1, le=MAX_COUNT)  # consecutive failed checks: unhealthy
    healthy_threshold: int = Field(default=2, ge=1, le=MAX_COUNT)    # consecutive passed checks: healthy again
    service: str = ""                                  # the health service name asked of backends

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> HealthChecksConfig:
        if self.timeout_ms > self.interval_ms:
            raise ValueError("timeout_ms must be <= interval_ms")
        return self


class OutlierDetectionConfig(Section):
    """Passive ejection of backends whose real calls keep failing."""

    consecutive_failures: int = Field(default=5, ge=1, le=MAX_COUNT)
    base_ejection_ms: int = Field(default=30_000, gt=0, le=MAX_MS)   # times the number of ejections so far
    max_ejection_ms: int = Field(default=300_000, gt=0, le=MAX_MS)
    max_ejection_percent: int = Field(default=50, ge=0, le=100)  # of a model's backends (one always may go)


RetryableCode = Literal["UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"]


class RetriesConfig(Section):
    """Retrying a failed attempt on another backend, before anything reached the caller."""

    max_attempts: int = Field(default=2, ge=1, le=MAX_COUNT)  # 1 = never retry
    retry_on: list[RetryableCode] = Field(default_factory=lambda: list[RetryableCode](["UNAVAILABLE"]))
    budget_percent: float = Field(default=20.0, ge=0, le=100)  # retries <= this share of recent calls
    min_retries_per_second: float = Field(default=3.0, ge=0, le=MAX_COUNT)  # ... but at least this many


class OverridesConfig(Section):
    """Where operator routing overrides are kept (see routing/overrides.py)."""

    store: Literal["file", "redis"] = "file"          # file: state_dir; redis: limits.redis_url, shared
    sync_interval_ms: int = Field(default=1_000, gt=0, le=MAX_MS)  # redis: how soon other sidecars' changes apply


class ShutdownConfig(Section):
    grace_ms: int = Field(default=15_000, ge=0, le=MAX_MS)  # in-flight calls get this long after SIGTERM




class UsageFileConfig(Section):
    path: PathText = "./var/usage/usage.jsonl"
    max_bytes: int = Field(default=100 * 1024 * 1024, gt=0, le=MAX_DISK_BYTES)  # rotate past this size
    backups: int = Field(default=5, ge=0, le=MAX_COUNT)                         # rotated files kept


# librdkafka properties the sidecar sets itself: delivery guarantees depend on them
KAFKA_OWNED_PROPERTIES = frozenset({
    "bootstrap.servers", "enable.idempotence", "acks", "request.required.acks", "compression.type",
    "compression.codec", "linger.ms", "queue.buffering.max.ms", "message.timeout.ms", "delivery.timeout.ms",
    "message.max.bytes", "statistics.interval.ms", "transactional.id", "max.in.flight.requests.per.connection",
    "max.in.flight", "retries", "message.send.max.retries", "error_cb", "stats_cb", "logger"})


# librdkafka properties naming a file it reads when a producer is built (checked at start)
KAFKA_FILE_PROPERTIES = ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.crl.location",
                         "ssl.keystore.location", "sasl.kerberos.keytab")


class UsageKafkaConfig(Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = Field(default="inference.usage", min_length=1)
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    linger_ms: int = Field(default=50, ge=0, le=MAX_MS)                # records of this long share a request
    delivery_timeout_ms: int = Field(default=30_000, gt=0, le=MAX_MS)  # unacknowledged this long -> the spool
    # the topic's max.message.bytes: a bigger record cannot be written and goes to the DLQ
    max_message_bytes: int = Field(default=1_048_588, gt=0, le=1_000_000_000)  # librdkafka's maximum
    replay_backoff_ms: int = Field(default=500, gt=0, le=MAX_MS)  # first wait before a replay; doubles to 30 s
    client_id: str = "inference-sidecar"
    # more librdkafka properties, e.g. security.protocol, sasl.mechanism, ssl.ca.location
    properties: dict[str, KafkaValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_owned_properties(self) -> UsageKafkaConfig:
        owned = sorted(set(self.properties) & KAFKA_OWNED_PROPERTIES)
        if owned:
            raise ValueError(f"properties: {', '.join(owned)} cannot be set here: the sidecar sets "
                             "them for its delivery guarantee (use the usage.kafka keys)")
        return self


class UsageConfig(Section):
    """Where usage records go: `kafka` through the write-ahead spool, a `file`, or `none`."""

    sink: Literal["none", "file", "kafka"] = "none"
    file: UsageFileConfig = UsageFileConfig()
    kafka: UsageKafkaConfig = UsageKafkaConfig()
    spool_dir: PathText = "./var/spool"                    # kafka: the write-ahead spool and the DLQ
    # interval: fsync every fsync_interval_ms; strict: a call's response waits for its record's fsync
    durability: Literal["interval", "strict"] = "interval"
    fsync_interval_ms: int = Field(default=20, gt=0, le=MAX_MS)
    max_spool_bytes: int = Field(default=1024 * 1024 * 1024, ge=64 * 1024, le=MAX_DISK_BYTES)
    # reject: calls fail UNAVAILABLE while the spool is full; drop_oldest: the oldest segment goes (counted)
    on_spool_full: Literal["reject", "drop_oldest"] = "reject"
    segment_bytes: int = Field(default=16 * 1024 * 1024, ge=4096, le=MAX_INT32)


class AuditConfig(Section):
    """Where each call's decision record is kept for `Audit.GetRequest`."""

    store: Literal["memory", "redis"] = "memory"          # redis: limits.redis_url, any sidecar answers
    max_records: int = Field(default=10_000, ge=1, le=MAX_COUNT)       # memory: the oldest go beyond this
    ttl_seconds: int = Field(default=86_400, ge=1, le=MAX_SECONDS)     # redis: records expire after this


class TelemetryConfig(Section):
    """Traces (OTLP/gRPC) and the format of log lines."""

    otlp_endpoint: OtlpEndpoint = ""   # empty: no traces
    # with an https:// endpoint: the collector's CA, a client certificate (mutual TLS), the name to verify
    otlp_tls: ClientTlsConfig | None = None
    otlp_headers: dict[str, str] = Field(default_factory=dict)  # sent with every export, e.g. a collector's API key
    export_timeout_ms: int = Field(default=10_000, gt=0, le=MAX_MS)
    # parent-based: a caller's sampled flag decides; otherwise this share of new traces is sampled
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    service_name: str = "inference-sidecar"
    resource_attributes: dict[str, str] = Field(default_factory=dict)  # added to the OTLP resource, e.g. k8s.pod.name
    max_queued_spans: int = Field(default=8192, ge=64, le=MAX_COUNT)  # beyond this, spans are dropped (counted)
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True                    # one line per inference call

    @field_validator("otlp_tls")
    @classmethod
    def _tls_needs_https(cls, tls: ClientTlsConfig | None, info: ValidationInfo) -> ClientTlsConfig | None:
        endpoint = info.data.get("otlp_endpoint")
        if tls is not None and endpoint is not None and not endpoint.startswith("https://"):
            raise ValueError("only with an https:// otlp_endpoint")
        return tls


class ServerTlsConfig(Section):
    """TLS on a listener: its certificate and key (PEM files), and, to require callers to present
    a certificate (mutual TLS), the CA that must have signed it."""

    cert_file: PathText
    key_file: PathText
    client_ca_file: PathText | None = None


class TlsConfig(Section):
    listen: ServerTlsConfig | None = None        # the inference listener
    admin_listen: ServerTlsConfig | None = None  # the admin listener
    backends: ClientTlsConfig | None = None      # the default of every backend (a model or backend may set its own)


class EtcdTlsConfig(ClientTlsConfig):
    """TLS to etcd: the CA that signed etcd's server certificate (required), and a client
    certificate when etcd asks for one (`--client-cert-auth`). PEM files, read at start.
    `server_name`: the name in etcd's certificate, when the endpoints are IP addresses."""

    ca_file: PathText


class ConfigSourceConfig(Section):
    """Where the live config comes from: this file (`file`), or one etcd key (`etcd`) that every
    sidecar of a fleet watches (config_etcd.py). Read once at start: every key needs a restart."""

    kind: Literal["file", "etcd"] = "file"
    endpoints: list[Address] = Field(default_factory=list, max_length=100)  # etcd members, host:port
    key: str = Field(default="/sidecar/config", min_length=1, max_length=1024)
    cache_file: PathText = "./var/config-cache.json"  # the last config applied: a start while etcd is down
    timeout_ms: int = Field(default=2_000, gt=0, le=MAX_MS)  # one etcd request (the read at start included)
    username: str | None = Field(default=None, min_length=1)
    password: str | None = Field(default=None, repr=False)   # use ${ENV}; never logged
    tls: EtcdTlsConfig | None = None
