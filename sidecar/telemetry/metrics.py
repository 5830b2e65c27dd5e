"""Every metric the sidecar exports, declared once, with fixed and bounded label names.

Label values come from config (org, key id, model, backend, limit name) or from small fixed
sets (codes, reasons, stores, outcomes): never from a request id or other caller input.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RATE_LIMIT_DENIALS = Counter(
    "api_router_rate_limit_denials", "Calls denied by a rate limit.", ["org", "limit"])
RATE_LIMIT_SHADOW_DENIALS = Counter(
    "api_router_rate_limit_shadow_denials", "Calls a shadow rate limit would have denied (admitted).",
    ["org", "limit"])
BUDGET_DENIALS = Counter(
    "api_router_budget_denials", "Calls denied because a budget of the org had no room for them.", ["org"])
LIMIT_DECISION_SECONDS = Histogram(
    "api_router_limit_decision_duration_seconds",
    "Time to decide every rate limit and budget of one call (one store round trip).", ["store"],
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))
LIMIT_STORE_DEGRADED_DECISIONS = Counter(
    "api_router_limit_degraded_decisions",
    "Decisions made while the shared limit store was unavailable (allowed/denied locally, or denied "
    "by on_store_error: deny).", ["outcome"])
LIMIT_STORE_ERRORS = Counter(
    "api_router_limit_store_errors", "Calls to the shared limit store that failed or timed out.")
LIMIT_STORE_DEGRADED = Gauge(
    "api_router_limit_store_degraded", "1 while a breaker of the shared limit store is open (on a Redis "
    "Cluster: one node's), else 0.")
LIMIT_FLEET_SIZE = Gauge(
    "api_router_limit_fleet_sidecars", "Sidecars sharing the limit store, as last counted (0: never); while "
    "the store is out each one decides 1/this of every limit locally.")
ROUTING_DECISIONS = Counter(
    "api_router_routing_decisions", "Backends chosen for calls: primary tier, or failover (a lower tier, "
    "or a retry on another backend).", ["model", "backend", "decision"])
BACKEND_REQUESTS = Counter(
    "api_router_backend_requests", "Attempts sent to backends, by outcome (gRPC code; CANCELLED when "
    "the caller went away).", ["model", "backend", "code"])
BACKEND_DURATION = Histogram(
    "api_router_backend_request_duration_seconds", "Duration of attempts on backends (streams: to the end).",
    ["model", "backend"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BACKEND_ERRORS = Counter(
    "api_router_backend_errors", "Attempts that count against a backend (they feed outlier ejection).",
    ["model", "backend", "error_type"])
BACKEND_USAGE_CLAMPED = Counter(
    "api_router_backend_usage_clamped", "Backend answers that reported more tokens than the call could use; "
    "billed at the call's cap (billing.py).", ["model", "backend"])
CALL_FINISHER_ERRORS = Counter(
    "api_router_call_finisher_errors", "Finishers (settlement, records, metrics, access log, trace) that "
    "raised at the end of a call; the others still ran.", ["finisher"])
BACKEND_EJECTIONS = Counter(
    "api_router_backend_ejections", "Times a backend was ejected after consecutive failures.", ["model", "backend"])
BACKEND_TLS_ERRORS = Counter(
    "api_router_backend_tls_errors", "TLS handshakes with a backend that failed, seen by calls and by health "
    "checks, by cause (unknown_ca, name_mismatch, expired, client_cert_rejected, not_tls, other).",
    ["model", "backend", "cause"])
BACKEND_HEALTHY = Gauge(
    "api_router_backend_healthy", "1 while a backend passes health checks and is not ejected, else 0.",
    ["model", "backend"])
USAGE_RECORDS_PUBLISHED = Counter(
    "api_router_usage_records_published", "Usage records handed to their sink for good (file: written).",
    ["sink"])
USAGE_PUBLISH_SECONDS = Histogram(
    "api_router_usage_records_publish_duration_seconds",
    "Time to publish a usage record for good (kafka: from the producer taking it to the broker's ack; "
    "file: from the call's end to the write).", ["sink"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
USAGE_RECORDS_BUFFERED = Counter(
    "api_router_usage_records_buffered", "Usage records appended to the write-ahead spool.")
USAGE_RECORDS_DROPPED = Counter(
    "api_router_usage_records_dropped", "Usage records lost: spool_full (on_spool_full: drop_oldest), "
    "refused_call (calls refused because the spool was full; they were not billable), file_unwritable "
    "(usage.sink: file could not write them: more held than it keeps, or still held at shutdown).",
    ["reason"])
USAGE_DEAD_LETTERED = Counter(
    "api_router_usage_records_dead_lettered", "Usage records Kafka rejected for good, moved to the DLQ.",
    ["reason"])
USAGE_DLQ_RECORDS = Gauge(
    "api_router_usage_dlq_records", "Usage records in the dead-letter store that are not resolved yet.")
BUFFER_STORE_SIZE = Gauge(
    "api_router_buffer_store_size", "Usage records in the spool that Kafka has not acknowledged yet.")
BUFFER_STORE_BYTES = Gauge(
    "api_router_buffer_store_bytes", "Bytes of the usage spool's segments.")
BUFFER_STORE_RETRIES = Counter(
    "api_router_buffer_store_retries", "Usage records sent to Kafka again from the spool (replays).")
BUFFER_STORE_AGE = Gauge(
    "api_router_buffer_store_age_seconds", "Age of the oldest usage record Kafka has not acknowledged (0 if none).")
SPOOL_TORN_TAILS = Counter(
    "api_router_buffer_store_torn_tails", "Spool segments whose torn tail was truncated at start.")
SPOOL_TORN_BYTES = Counter(
    "api_router_buffer_store_torn_bytes", "Bytes cut from torn spool tails at start.")
KAFKA_PRODUCER_REBUILDS = Counter(
    "api_router_usage_producer_rebuilds", "Kafka producers replaced after a fatal or stuck state.", ["cause"])
KAFKA_UP = Gauge(
    "api_router_usage_kafka_up", "1 while the usage producer has a connection to a Kafka broker and records "
    "in flight get acknowledged (none for 5 s: 0), else 0.")

SIDECAR_OVERHEAD_SECONDS = Histogram(
    "api_router_sidecar_overhead_seconds", "What the sidecar itself added to an inference call: its duration "
    "minus the time its backend attempts took (auth, limits, routing, proxying, records).", ["grpc_method"],
    buckets=(0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05,
             0.1, 0.25, 1.0))

# --- traces --------------------------------------------------------------------------------------
TRACE_SPANS_EXPORTED = Counter(
    "api_router_trace_spans_exported", "Spans the OTLP collector accepted.")
TRACE_SPANS_DROPPED = Counter(
    "api_router_trace_spans_dropped", "Spans not exported: queue_full (the collector is slower than the "
    "calls), export_failed (the collector refused or did not answer in time).", ["reason"])

# --- gRPC server (the go-grpc-prometheus names, for every service the sidecar serves) ------------
GRPC_TYPES = ("unary", "server_stream", "client_stream", "bidi_stream")
GRPC_SERVER_HANDLED = Counter(
    "grpc_server_handled", "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"])
GRPC_SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds", "Time from the start of an RPC to its status, on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    # sub-millisecond (health, refusals) up to multi-second inference streams
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

# --- the build ----------------------------------------------------------------------------------
BUILD_INFO = Gauge(
    "sidecar_build_info", "Always 1; the labels say which build runs.", ["version", "commit", "build_time"])

# --- config reloads -----------------------------------------------------------------------------
CONFIG_RELOAD_RESULTS = ("success", "failure", "unchanged")
CONFIG_RELOADS = Counter(
    "api_router_config_reloads", "Config reloads (SIGHUP, a change of the file, or a new revision of the etcd "
    "key): success (applied), failure (invalid, or a change that needs a restart; the old config keeps "
    "serving), unchanged (SIGHUP with the running file, or a revision with the running content).", ["result"])
CONFIG_SOURCE_UP = Gauge(
    "api_router_config_source_up", "1 while the config source can be read (a file: always; etcd: the key was "
    "read and is watched), else 0 (the sidecar serves the config it has).")
CONFIG_SOURCE_REVISION = Gauge(
    "api_router_config_source_revision", "etcd source: the revision (mod_revision) of the config that runs; "
    "0 for a file.")

# --- TLS listeners (tls_server.py) ------------------------------------------------------------
TLS_LISTENERS = ("listen", "admin_listen")
TLS_CERTIFICATE_EXPIRY = Gauge(
    "api_router_tls_certificate_expiry_timestamp_seconds", "When the certificate a TLS listener serves expires "
    "(Unix seconds); a series per listener with TLS.", ["listener"])
TLS_CERTIFICATE_RELOAD_RESULTS = ("success", "failure")
TLS_CERTIFICATE_RELOADS = Counter(
    "api_router_tls_certificate_reloads", "Changed certificate files of a TLS listener: success (new connections "
    "get the new certificate), failure (unusable files; the previous certificate keeps serving).",
    ["listener", "result"])
