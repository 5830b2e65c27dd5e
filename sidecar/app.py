"""Composition root: builds the runtime from a config, starts the listeners, stops in order.

Shutdown order (SIGTERM/SIGINT): readiness NOT_SERVING at once (Watch streams see it) -> new
inference calls refused -> in-flight calls get `shutdown.grace_ms` to finish -> servers stop
(cancelling what is left, health watches included) -> the last settlements of limits and
budgets finish -> usage records: Kafka gets a few seconds for what it has not acknowledged
(what is left stays in the spool for the next start) -> the last access lines and spans go out
-> the limit store, ops listener and backend channels close.

Config reload (SIGHUP, or a change of the file `sidecar run --config` names, polled every
second): the new file is read and validated in a worker thread (calls go on meanwhile), and keys
that need a restart are refused, before anything changes; a valid config is swapped in one
synchronous step on the event loop (calls already admitted finish under the old one), channels
and health checks follow its backends, and removed backends' channels drain. An invalid one is
logged (`config reload rejected`, one key path per problem) and the old config keeps serving.
Counted in `api_router_config_reloads_total{result}`. With an etcd config source
(config_etcd.py) each new revision of the key takes the same path (`offer_config`), and SIGHUP
reads the key again.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sidecar_client.inference.v1 import inference_pb2  # registers the service descriptor
from sidecar_client.sidecar.admin.v1 import admin_pb2, admin_pb2_grpc

from sidecar import __version__, redis_client
from sidecar.config import Config, ConfigError, config_text
from sidecar.config_etcd import EtcdConfigSource, file_source_component
from sidecar.limits.guarded import GuardedStore
from sidecar.limits.memory_store import MemoryLimitStore
from sidecar.limits.redis_store import RedisLimitStore
from sidecar.limits.store import LimitStore
from sidecar.listener_tls import exposed_without_tls
from sidecar.oip import service as oip
from sidecar.ops.admin_auth import AdminAuth
from sidecar.ops.admin_service import AuditService, RoutingAdmin
from sidecar.ops.health import Health
from sidecar.ops.http import OpsServer
from sidecar.pipeline import build_pipeline, build_probe_pipeline
from sidecar.reload import check_reload, describe_changes, read_config_text, watch_file
from sidecar.routing.backend_tls import keep_credentials_fresh
from sidecar.routing.channels import Channels, message_options
from sidecar.routing.health_checks import HealthChecker
from sidecar.routing.router import Router
from sidecar.server import SERVICE, InferenceHandlers, InFlight
from sidecar.tasks import Tasks
from sidecar.telemetry.build import build_info
from sidecar.telemetry.grpc_server import ObservedServer
from sidecar.telemetry.logging import AccessLog
from sidecar.telemetry.metrics import (
    BUILD_INFO,
    CONFIG_RELOAD_RESULTS,
    CONFIG_RELOADS,
    TRACE_SPANS_DROPPED,
    USAGE_RECORDS_DROPPED,
)
from sidecar.telemetry.tracing import Tracer
from sidecar.tls_server import ListenerTls, listener_tls, tls_component
from sidecar.usage.audit import AuditStore, MemoryAudit, RedisAudit
from sidecar.usage.dlq import DeadLetters
from sidecar.usage.kafka_sink import KafkaSink
from sidecar.usage.sinks import FileSink, NoSink, UsageSink
from sidecar.usage.spool import open_spool

log = logging.getLogger("sidecar.app")


def config_version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Listeners:
    """The addresses actually bound (a configured port 0 becomes a real port here)."""

    listen: str = ""
    admin_listen: str = ""
    ops_listen: str = ""
    health_listen: str = ""  # "": not configured
    extra: dict[str, str] = field(default_factory=dict)


class Sidecar:
    def __init__(self, config: Config, version: str, config_path: str | Path | None = None,
                 config_source: EtcdConfigSource | None = None) -> None:
        self.config = config
        self.config_path = config_path  # what reloads read; None: no reloads (e.g. `sidecar demo`)
        self.config_source = config_source  # etcd: new revisions are offered (`offer_config`)
        self._rejected_version: str | None = None  # the file's last rejected content
        self._rejected_problems: list[str] = []    # and why
        self._reload_turn = asyncio.Lock()                # reloads run one at a time
        self._queued: asyncio.Task[str] | None = None     # a reload waiting for its turn,
        self._queued_trigger = "signal"                   # and its trigger
        # series that only count rare events exist at 0 from the start, so that increase() sees
        # their first event
        for result in CONFIG_RELOAD_RESULTS:
            CONFIG_RELOADS.labels(result)
        for reason in ("spool_full", "refused_call", "file_unwritable"):
            USAGE_RECORDS_DROPPED.labels(reason)
        for reason in ("queue_full", "export_failed"):
            TRACE_SPANS_DROPPED.labels(reason)
        BUILD_INFO.labels(**build_info()).set(1)
        self.health = Health(version)
        # first: unusable certificate files end the start here (ConfigError, exit 2), before
        # anything is opened; the files rotate without a restart (tls_server.py)
        self.listener_tls = listener_tls(config.tls)
        if self.listener_tls:
            self.health.components_from["tls"] = lambda: tls_component(self.listener_tls)
        self.in_flight = InFlight()
        self.channels = Channels(config)
        self.tasks = Tasks()
        self.router = Router(config, self.channels.backends)
        self.router.on_change = self._routes_changed
        self.health_checker = HealthChecker(self.router, self.channels, config.health_checks)
        if config.overrides.store == "redis":
            assert config.limits.redis_url is not None  # validated
            timeout = config.limits.redis_timeout_ms / 1000.0
            self.router.overrides.redis = redis_client.connect(config.limits.redis_url, timeout,
                                                               socket_timeout=timeout, tls=config.limits.redis_tls)
        self.health.backends_ok = self.router.any_routable
        self.health.components_from["backends"] = self.router.component
        self.health.components_from["calls"] = lambda: {"status": "ok", "in_flight": self.in_flight.count}
        self.health.components_from["config_source"] = (
            config_source.component if config_source is not None else file_source_component(config_path))
        self.limit_store = limit_store(config)
        self.health.components_from["limits"] = self.limit_store.component
        self.usage = usage_sink(config)
        self.health.components_from["usage"] = self.usage.component
        self.health.ready_checks.append(lambda: not self.usage.refusing())
        if isinstance(self.usage, KafkaSink):
            self.usage.spool.on_change = self._routes_changed
        self.audit = audit_store(config)
        self.tracer = Tracer(lambda: self.config)
        self.access_log = AccessLog(lambda: self.config)
        self.pipeline = build_pipeline(lambda: self.config, self.router, self.limit_store, self.usage, self.audit,
                                       self.tracer, self.access_log)
        self.probes = build_probe_pipeline(lambda: self.config, self.router, self.tracer, self.access_log)
        self.listeners = Listeners()
        self._server = self._grpc_server()
        self._admin = self._grpc_server(ObservedServer(), AdminAuth(lambda: self.config))
        # `health_listen`: grpc.health.v1 alone, for the kubelet's grpc: probes (plaintext only)
        self._health_server = self._grpc_server() if config.health_listen is not None else None
        self._ops = OpsServer(self.health)
        self._stopped = asyncio.Event()

    async def _sync_overrides(self) -> None:
        while True:
            await asyncio.sleep(self.config.overrides.sync_interval_ms / 1000.0)
            await self.router.sync_overrides()

    def _routes_changed(self) -> None:
        """A backend became (un)healthy or was ejected, or the usage spool filled up or has room
        again: readiness may have changed."""
        self.tasks.spawn(self.health.publish(), name="readiness")

    def _grpc_servers(self) -> list[grpc.aio.Server]:
        """Inference, admin and, when configured, health: started and stopped together."""
        return [self._server, self._admin, *([self._health_server] if self._health_server is not None else [])]

    def _grpc_server(self, *interceptors: grpc.aio.ServerInterceptor) -> grpc.aio.Server:
        # so_reuseport off: a second sidecar on the same port must fail, not share the traffic
        options = [*message_options(self.config.max_message_bytes), ("grpc.so_reuseport", 0)]
        return grpc.aio.server(options=options, interceptors=interceptors)

    async def start(self) -> None:
        await self.limit_store.start()  # Redis's clock, for budget windows
        await self.usage.start()  # replays what an earlier run left in the spool
        handlers = InferenceHandlers(self.pipeline, self.in_flight, self.router, self.tracer.sampling)
        self._server.add_registered_method_handlers(SERVICE, handlers.method_handlers())
        # the Open Inference Protocol, on the same port (oip/service.py)
        oip_handlers = oip.OipHandlers(self.pipeline, self.probes, self.in_flight, self.router,
                                       lambda: self.health.ready, __version__, self.tracer.sampling)
        self._server.add_registered_method_handlers(oip.SERVICE, oip_handlers.method_handlers())
        self._server.add_generic_rpc_handlers((oip_handlers.fallback(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer(), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer(), self._admin)
        admin_pb2_grpc.add_RoutingAdminServicer_to_server(RoutingAdmin(self.router), self._admin)
        admin_pb2_grpc.add_AuditServicer_to_server(AuditService(self.audit), self._admin)
        names = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._server)
        admin_names = (admin_pb2.DESCRIPTOR.services_by_name["RoutingAdmin"].full_name,
                       admin_pb2.DESCRIPTOR.services_by_name["Audit"].full_name, names[1], reflection.SERVICE_NAME)
        reflection.enable_server_reflection(admin_names, self._admin)
        self.listeners.listen = _bind(self._server, self.config.listen, self.listener_tls.get("listen"))
        self.listeners.admin_listen = _bind(self._admin, self.config.admin_listen, self.listener_tls.get("admin_listen"))
        if self._health_server is not None:
            assert self.config.health_listen is not None  # the server exists for it
            # the same state as the other listeners; nothing else (no reflection: a probe needs
            # none; any other service is UNIMPLEMENTED). Plaintext: health carries no secrets, and
            # the kubelet's grpc: probes cannot speak TLS
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer(), self._health_server)
            self.listeners.health_listen = _bind(self._health_server, self.config.health_listen, None)
        for server in self._grpc_servers():
            await server.start()
        # after the gRPC servers: /healthz answering (a startup probe) means that they accept
        self.listeners.ops_listen = _with_port(self.config.ops_listen, await self._ops.start(self.config.ops_listen))
        if exposed_without_tls(self.config.listen, self.config.tls.listen):
            log.warning("listen is reachable beyond this host without TLS", extra={
                "listen": self.config.listen, "fix": "bind it to loopback, or set tls.listen"})
        for tls in self.listener_tls.values():
            self.tasks.spawn(tls.watch(), name=f"tls-watch {tls.listener}")
        if self.config.auth is None:
            log.warning("auth is not configured: every caller is accepted as org 'anonymous'")
        await self.router.load_overrides()
        if self.config.overrides.store == "redis":
            self.tasks.spawn(self._sync_overrides(), name="overrides-sync")
        self.health_checker.start()
        # backend certificate files rotated: new channels, the old ones drain (routing/backend_tls.py)
        self.tasks.spawn(keep_credentials_fresh(self.channels, self.router, self.tasks.spawn), name="backend-tls-watch")
        if self.config_path is not None:
            self.tasks.spawn(watch_file(self.config_path, lambda: self.reload("file")), name="config-watch")
        if self.config_source is not None:
            self.tasks.spawn(self.config_source.run(self.offer_config), name="config-source")
        if self.tracer.enabled:
            self.tasks.spawn(self.tracer.run(), name="trace-export")
        await self.health.mark_started()
        log.info("sidecar ready", extra={"listen": self.listeners.listen, "admin_listen": self.listeners.admin_listen,
                                         "ops_listen": self.listeners.ops_listen,
                                         "health_listen": self.listeners.health_listen or None,
                                         "tls": {name: "mutual" if tls.mutual else "server"
                                                 for name, tls in self.listener_tls.items()},
                                         "config_version": self.health.config_version,
                                         "models": sorted(self.config.models)})

    async def stop(self) -> None:
        """Drains and stops; safe to call more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.shutdown.grace_ms / 1000.0
        log.info("draining", extra={"in_flight": self.in_flight.count, "grace_ms": self.config.shutdown.grace_ms})
        await self.health.mark_draining()
        self.in_flight.close()
        finished = await self.in_flight.wait_idle(grace)
        if not finished:
            log.warning("grace period over; cancelling calls", extra={"in_flight": self.in_flight.count})
        # the health listener too: it answers NOT_SERVING through the drain, like the others
        await asyncio.gather(*(server.stop(None) for server in self._grpc_servers()))
        await self.health_checker.aclose()
        await self.tasks.aclose(timeout=0)  # readiness pushes, the overrides sync, the config source
        if self.config_source is not None:
            await self.config_source.aclose()
        if self.router.overrides.redis is not None:
            await self.router.overrides.redis.aclose()
        await self.limit_store.aclose()  # sends the settlements of the calls that just ended
        await self.usage.aclose()  # writes the records of the calls that just ended
        await self.audit.aclose()
        self.access_log.flush()
        await self.tracer.aclose()  # a last export of the spans of the calls that just ended
        await self._ops.aclose()
        await self.channels.aclose()
        log.info("stopped", extra={"clean": finished})

    async def run_until_signalled(self) -> None:
        """Serves until SIGTERM or SIGINT, then drains and stops."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await stop.wait()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await self.stop()

    def reload(self, trigger: str = "signal") -> asyncio.Task[str] | None:
        """Reads the config file again and applies it when it is valid (SIGHUP: `signal`; a
        change of the file: `file`). Returns at once: the reading, parsing and validating run in
        a worker thread, so a big or hostile file never stalls calls, and only the swap runs on
        the event loop, in one synchronous step, so no call sees half of one. Reloads run one at
        a time; triggers while one runs make one more reload (SIGHUP's trigger wins), which reads
        the file as it is then. Returns that reload's task (its result: what it counted, or
        `ignored`), or None when ignored at once. With an etcd source, reads the key again."""
        if self.config_source is not None and self.health.started and not self._stopped.is_set():
            return self.tasks.spawn(self.config_source.resync(self.offer_config), name="config-resync")
        if self.config_path is None or not self.health.started or self._stopped.is_set():
            log.warning("config reload ignored", extra={"trigger": trigger, "reason": "no config file"
                        if self.config_path is None else "starting or stopping"})
            return None
        if self._queued is not None:  # a reload waits for its turn: it will read the file anew
            self._queued_trigger = "signal" if "signal" in (trigger, self._queued_trigger) else trigger
            return self._queued
        self._queued_trigger = trigger
        self._queued = self.tasks.spawn(self._reload_in_turn(self.config_path), name="config-reload")
        return self._queued

    async def _reload_in_turn(self, path: str | Path) -> str:
        async with self._reload_turn:
            trigger, self._queued = self._queued_trigger, None
            try:
                result = await self._reload(path, trigger)
            except Exception:  # a bug must not take the reload triggers down with it
                log.exception("config reload failed", extra={"trigger": trigger})
                result = "failure"
        if result in CONFIG_RELOAD_RESULTS:
            CONFIG_RELOADS.labels(result).inc()
        return result

    async def offer_config(self, data: bytes, where: str) -> tuple[str, list[str]]:
        """A new value of the config source (an etcd revision, `where`): validated and swapped in
        exactly like a reloaded file, in turn with reloads, and counted alike. Returns what
        became of it and, when refused, the problems."""
        async with self._reload_turn:
            try:
                result = await self._reload(where, "etcd", data)
            except Exception:  # a bug must not take the config source down with it
                log.exception("config reload failed", extra={"trigger": "etcd", "path": where})
                result, self._rejected_problems = "failure", ["(root): failed while applying; see the log"]
        if result in CONFIG_RELOAD_RESULTS:
            CONFIG_RELOADS.labels(result).inc()
        return result, self._rejected_problems if result == "failure" else []

    async def _reload(self, path: str | Path, trigger: str, data: bytes | None = None) -> str:
        """The same content as the running config is `unchanged`; the file trigger leaves it
        uncounted (it also fires when only the file's stamp moved, e.g. a ConfigMap update of
        another key) and skips the content it rejected last, which was logged then; SIGHUP always
        validates again. A reload that finishes validating while the sidecar stops is dropped.
        `data`: an etcd value (`path` says which), bounded like a file; the same content as the
        running config is `unchanged`."""
        running, rejected = self.health.config_version, self._rejected_version
        version: str | None = None  # the file's, once read

        def read() -> tuple[str, str]:
            # at most 1 MiB, UTF-8 (config_yaml.py)
            text = read_config_text(path) if data is None else config_text(data, str(path))
            return text, config_version(text)

        try:
            text, new_version = await asyncio.to_thread(read)
            version = new_version
            if version == running or (trigger == "file" and version == rejected):
                if trigger == "file":
                    return "ignored"
                log.info("config unchanged", extra={"trigger": trigger, "config_version": running})
                return "unchanged"
            config = await asyncio.to_thread(check_reload, self.config, text, remote=data is not None)
        except ConfigError as exc:
            self._rejected_version, self._rejected_problems = version, exc.problems
            log.error("config reload rejected", extra={"trigger": trigger, "path": str(path),
                                                       "problems": exc.problems, "config_version": running})
            return "failure"
        if self._stopped.is_set():
            return "ignored"
        self._apply_config(config, new_version, trigger)
        return "success"

    def _apply_config(self, config: Config, version: str, trigger: str) -> None:
        """Swaps a validated config in: routing follows its backends (what is known about those
        that stay is kept), the rest of the runtime reads `self.config` on every call."""
        old, old_version = self.config, self.health.config_version
        removed = self.channels.reconfigure(config)
        self.router.reconfigure(config, self.channels.backends)
        self.health_checker.reconfigure(config.health_checks)
        self.config, self.health.config_version, self._rejected_version = config, version, None
        # a call started before the swap ends within its model's timeout: then its channel may go
        grace = max(model.timeout_ms for model in old.models.values()) / 1000.0
        for key, channel in removed.items():
            self.tasks.spawn(self.channels.drain(key, channel, grace), name=f"drain-channel {key}")
        self._routes_changed()
        log.info("config reloaded", extra={"trigger": trigger, "old_version": old_version, "new_version": version,
                                           **describe_changes(old, config)})
        if config.auth is None and old.auth is not None:
            log.warning("auth is not configured: every caller is accepted as org 'anonymous'")


def limit_store(config: Config) -> LimitStore:
    """The store that `limits.store` names; Redis comes behind its breaker and fallback."""
    limits = config.limits
    if limits.store == "memory":
        return MemoryLimitStore()
    assert limits.redis_url is not None  # validated
    redis = RedisLimitStore(limits.redis_url, timeout=limits.redis_timeout_ms / 1000.0, tls=limits.redis_tls)
    return GuardedStore(redis, on_error=limits.on_store_error, share=1.0 / limits.expected_replicas,
                        failures=limits.breaker_failures, cooldown=limits.breaker_cooldown_ms / 1000.0)


def usage_sink(config: Config) -> UsageSink:
    """The sink `usage.sink` names; kafka locks and recovers its spool here (raises
    `SpoolLocked` when another process owns it)."""
    usage = config.usage
    if usage.sink == "kafka":
        directory = Path(usage.spool_dir)
        spool = open_spool(directory, durability=usage.durability, fsync_interval=usage.fsync_interval_ms / 1000.0,
                           max_bytes=usage.max_spool_bytes, on_full=usage.on_spool_full,
                           segment_bytes=usage.segment_bytes)
        return KafkaSink(usage, spool, DeadLetters(directory / "dlq"))
    if config.usage.sink == "file":
        file = config.usage.file
        return FileSink(Path(file.path), file.max_bytes, file.backups)
    return NoSink()


def audit_store(config: Config) -> AuditStore:
    if config.audit.store == "redis":
        assert config.limits.redis_url is not None  # validated
        timeout = config.limits.redis_timeout_ms / 1000.0
        redis = redis_client.connect(config.limits.redis_url, timeout, socket_timeout=timeout,
                                     tls=config.limits.redis_tls)
        return RedisAudit(redis, config.audit.ttl_seconds)
    return MemoryAudit(config.audit.max_records)


def _bind(server: grpc.aio.Server, address: str, tls: ListenerTls | None) -> str:
    try:
        port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    return _with_port(address, port)


def _with_port(address: str, port: int) -> str:
    host = address.rpartition(":")[0]
    return f"{host}:{port}"
