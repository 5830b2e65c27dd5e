#!/usr/bin/env bash
# Real Open Inference Protocol (KServe v2) peers for the tests: MLServer (serves a tiny echo
# runtime) and tritonclient[grpc] (calls through the sidecar). Each lives in its own virtualenv:
# both need protobuf < 7 and ship their own `package inference` descriptors, so neither can share
# the project's venv (protobuf 7) nor each other's process.
#
# Cached: ${OIP_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-sidecar/oip}/{mlserver,tritonclient}.
# Idempotent: a venv whose stamp file names the pinned versions is left alone (a run with both
# in place takes milliseconds); a half-built one (no stamp) is rebuilt. Needs PyPI only when
# something is missing. Prints the two python interpreters' paths, one `NAME=PATH` a line.
# Python: $OIP_PEERS_PYTHON, else the first of python3, python3.12, python3.11, python3.10 that is
# 3.9-3.12 (MLServer 1.7 needs Python < 3.13).
set -euo pipefail

MLSERVER_PIN="mlserver==1.7.1"
TRITONCLIENT_PIN="tritonclient[grpc]==2.73.0"

DIR="${OIP_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/inference-sidecar/oip}"
mkdir -p "$DIR"

# one writer at a time (parallel test sessions share the cache)
exec 9>"$DIR/.lock"
flock 9

# the first of these that is Python 3.9-3.12 with venv support
supported='import sys, ensurepip, venv; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 12))'
PYTHON=""
for candidate in ${OIP_PEERS_PYTHON:-python3 python3.12 python3.11 python3.10}; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$supported" 2>/dev/null; then
    PYTHON="$candidate"
    break
  fi
done
if [ -z "$PYTHON" ]; then
  echo "oip_peers.sh: no Python 3.9-3.12 with venv/ensurepip found (MLServer 1.7 needs < 3.13);" \
       "install one (Debian: python3-venv) or set OIP_PEERS_PYTHON" >&2
  exit 2
fi
pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

# ensure NAME PIN...: a venv at $DIR/NAME with exactly these pins installed
ensure() {
  local name="$1"; shift
  local venv="$DIR/$name" stamp="$DIR/$name/.complete"
  local want="python$pyver $*"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "$name=$venv/bin/python"
    return
  fi
  local started=$SECONDS
  echo "oip_peers.sh: installing $* into $venv (one-off, ~30 s)" >&2
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  if ! { "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip >&2 &&
         "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" >&2; }; then
    echo "oip_peers.sh: pip install $* failed (is PyPI reachable?)" >&2
    rm -rf "$venv"
    exit 1
  fi
  echo "$want" >"$stamp"
  echo "oip_peers.sh: $name ready in $((SECONDS - started)) s" >&2
  echo "$name=$venv/bin/python"
}

ensure mlserver "$MLSERVER_PIN"
ensure tritonclient "$TRITONCLIENT_PIN"
