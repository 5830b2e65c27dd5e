# syntax=docker/dockerfile:1
#
# The inference sidecar image. Build (BuildKit, the default builder of current Docker):
#
#   docker build \
#     --build-arg SIDECAR_BUILD_COMMIT="$(git rev-parse HEAD)" \
#     --build-arg SIDECAR_BUILD_TIME="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#     -t registry.example.com/inference-sidecar:0.1.0 .
#
# The two build args end up in `sidecar version`, /healthz and the sidecar_build_info metric.
# See docs/operations/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels for the client package and the sidecar, and all their dependencies ---------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The client package (generated stubs, import name sidecar_client) first: it changes rarely.
COPY clients/python ./clients/python
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar

# One resolution for both: the sidecar's dependency `inference-sidecar-client` is satisfied by
# ./clients/python. Every dependency has manylinux wheels for CPython 3.11 (amd64, arm64), so no
# compiler is needed; `--only-binary :all:` keeps it that way (a missing wheel fails the build
# instead of silently compiling).
RUN pip wheel --wheel-dir /wheels --only-binary :all: ./clients/python . \
    && ls /wheels

# --- runtime: the wheels installed into a slim Python, nothing else --------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG SIDECAR_VERSION=0.1.0
ARG SIDECAR_BUILD_COMMIT=unknown
ARG SIDECAR_BUILD_TIME=unknown

LABEL org.opencontainers.image.title="inference-sidecar" \
      org.opencontainers.image.description="A gRPC routing sidecar for model inference: auth, limits, budgets, routing, usage records" \
      org.opencontainers.image.version="${SIDECAR_VERSION}" \
      org.opencontainers.image.revision="${SIDECAR_BUILD_COMMIT}" \
      org.opencontainers.image.created="${SIDECAR_BUILD_TIME}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SIDECAR_BUILD_COMMIT=${SIDECAR_BUILD_COMMIT} \
    SIDECAR_BUILD_TIME=${SIDECAR_BUILD_TIME}

# A fixed, numeric non-root user: Kubernetes' runAsNonRoot can verify it, and volume ownership
# (fsGroup) is predictable. /var/lib/sidecar holds the usage spool and the routing state; in
# Kubernetes a volume is mounted over it (the root filesystem is read-only there).
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sidecar --no-create-home \
       --shell /usr/sbin/nologin sidecar \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/sidecar /var/lib/sidecar/spool \
       /var/lib/sidecar/state /var/lib/sidecar/usage \
    && install -d -m 0755 /etc/sidecar

# Installed from the build stage's wheels only (--no-index: nothing is fetched here); the wheels
# are bind-mounted, so they are not part of any layer. No [test] extra, no build tools.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
    && sidecar version

WORKDIR /var/lib/sidecar
USER 10001:10001

# 50051  gRPC: inference.v1.Inference, grpc.health.v1.Health, reflection   (config `listen`)
# 50052  gRPC: admin (RoutingAdmin, Audit; admin token) and health          (config `admin_listen`)
# 9464   HTTP: /metrics (Prometheus), /healthz, /readyz                     (config `ops_listen`)
# All three listen on 127.0.0.1 unless the config says otherwise: a port is only reachable from
# outside the container when its address in the config is 0.0.0.0 (see deploy/kubernetes).
EXPOSE 50051 50052 9464

# No HEALTHCHECK: Kubernetes probes /healthz and /readyz on the ops listener directly (httpGet
# probes, deploy/kubernetes), and Docker's HEALTHCHECK is ignored there.
ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "/etc/sidecar/config.yaml"]
