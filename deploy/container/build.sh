#!/usr/bin/env bash
# Build edgeship's container images with Podman (or Docker: CONTAINER=docker). See docs/containers.md.
#
#   deploy/container/build.sh base  [--arch amd64|arm64]        Debian bookworm + python3 (mmdebstrap, no registry)
#   deploy/container/build.sh agent [--arch A] [--base IMAGE] [--tag T]   the device agent (no TensorFlow)
#   deploy/container/build.sh host  [--arch A] [--base IMAGE] [--tag T]   Mosquitto + edgeship fleet tools
#
# Python packages are resolved on this machine for the target architecture (pip download --platform, wheels
# only) into a cache and copied into the image: the agent image runs nothing at build time, so an arm64
# image builds on x86_64 without emulation, and a rebuild needs no network. Cache: $EDGESHIP_CONTAINER_CACHE
# (default ~/.cache/edgeship/containers). The images' Python is 3.11 (Debian bookworm's).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${EDGESHIP_CONTAINER_CACHE:-$HOME/.cache/edgeship/containers}"
CONTAINER="${CONTAINER:-podman}"
PY="${PYTHON:-python3}"
PYVER=3.11

what="${1:-}"; shift || true
arch="" base="" tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "$arch" ]; then
  case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch="$(uname -m)" ;; esac
fi
case "$arch" in
  amd64) machine=x86_64 ;;
  arm64) machine=aarch64 ;;
  *) echo "build.sh: --arch must be amd64 or arm64 (no armv7 wheels of LiteRT/ONNX Runtime exist)" >&2; exit 2 ;;
esac
base="${base:-localhost/edgeship-base:bookworm-$arch}"
mkdir -p "$CACHE"

# Podman on hosts without systemd cgroups or raisable ulimits (CI containers): see docs/containers.md.
if [ "$CONTAINER" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  export CONTAINERS_CONF="$CACHE/containers.conf"
  [ -f "$CONTAINERS_CONF" ] || cp "$HERE/containers.conf" "$CONTAINERS_CONF"
fi

build_base() {
  local tar="$CACHE/base-bookworm-$arch.tar" tmp="$CACHE/base-bookworm-$arch.partial.tar"  # mmdebstrap: format by suffix
  [ "$CONTAINER" = podman ] || { echo "build.sh base: needs Podman (podman import --arch); with Docker use --base" >&2; exit 2; }
  if [ ! -f "$tar" ]; then
    # Debian's own packages, slimmed like debian:bookworm-slim (no docs, man pages, locales).
    local slim=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
                --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
                --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
                --dpkgopt='path-exclude=/usr/share/info/*')
    if [ "$machine" = "$(uname -m)" ]; then
      mmdebstrap --variant=apt --architectures="$arch" --include=python3,ca-certificates,libstdc++6 "${slim[@]}" bookworm "$tmp"
    else
      # Another architecture, without emulation: the packages are extracted, not configured (their scripts
      # would have to run on that CPU). Enough for the agent image (Python, a shell, the CA bundle made
      # here); no apt, so the host image needs an image built on that architecture.
      mmdebstrap --variant=extract --architectures="$arch" --include=python3,ca-certificates,libstdc++6,dash "${slim[@]}" \
        --extract-hook='mkdir -p "$1/etc/ssl/certs" && cat "$1"/usr/share/ca-certificates/mozilla/*.crt > "$1/etc/ssl/certs/ca-certificates.crt"' \
        bookworm "$tmp"
    fi
    mv "$tmp" "$tar"
  fi
  "$CONTAINER" import --arch "$arch" --change 'CMD ["python3"]' "$tar" "localhost/edgeship-base:bookworm-$arch" >/dev/null
  echo "localhost/edgeship-base:bookworm-$arch"
}

# The image's Python packages, installed for the target platform into CTX/deps (cached by requirement set).
prepare() {  # $1 = extra (agent | fleet)
  local extra="$1" reqs key wheels site ctx
  reqs="$("$PY" - "$ROOT/pyproject.toml" "$extra" <<'EOF'
import sys, tomllib
doc = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(doc["dependencies"] + doc["optional-dependencies"][sys.argv[2]]))
EOF
)"
  key="$(printf '%s\n%s %s\n' "$reqs" "$arch" "$PYVER" | sha256sum | cut -c1-16)"
  ctx="$CACHE/ctx-$extra-$arch-$key"
  wheels="$CACHE/wheels-$arch-$key"
  local platform=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}"
                  --platform "manylinux2014_$machine")
  for n in $(seq 17 36); do platform+=(--platform "manylinux_2_${n}_$machine"); done  # pip does not widen one tag
  if [ ! -f "$wheels/.complete" ]; then
    rm -rf "$wheels.tmp" && mkdir -p "$wheels.tmp"
    printf '%s\n' "$reqs" > "$wheels.tmp/requirements.txt"
    "$PY" -m pip download -q --disable-pip-version-check -d "$wheels.tmp" "${platform[@]}" -r "$wheels.tmp/requirements.txt"
    touch "$wheels.tmp/.complete" && rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  if [ ! -f "$ctx/deps/.complete" ]; then
    rm -rf "$ctx" && mkdir -p "$ctx/deps"
    local compile=(--no-compile)
    # .pyc files only when this Python is the image's (3.11): faster cold start in the container
    [ "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$PYVER" ] && compile=()
    "$PY" -m pip install -q --disable-pip-version-check --no-warn-conflicts --no-index --find-links "$wheels" --target "$ctx/deps" \
      "${compile[@]}" "${platform[@]}" -r "$wheels/requirements.txt"
    rm -rf "$ctx/deps/bin"  # console scripts with this host's interpreter path: the image has its own
    touch "$ctx/deps/.complete"
  fi
  # edgeship itself: rebuilt every time (small), its own image layer
  rm -rf "$ctx/app" "$ctx/wheel" "$ctx/bin" "$ctx/config" && mkdir -p "$ctx/app" "$ctx/wheel" "$ctx/state"
  local src="$ctx/src"  # a copy, so building the wheel leaves nothing in the source tree
  rm -rf "$src" && mkdir -p "$src" && cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/agent" "$ROOT/toolkit" "$src/"
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$ctx/wheel" "$src"
  "$PY" -m pip install -q --disable-pip-version-check --no-warn-conflicts --no-index --no-deps --target "$ctx/app" "$ctx"/wheel/*.whl
  rm -rf "$ctx/app/bin" "$ctx/wheel" "$src"
  cp -r "$HERE/bin" "$ctx/bin"
  mkdir -p "$ctx/config" && cp -r "$HERE/broker" "$ctx/config/"
  echo "$ctx"
}

image() {  # $1 = agent | host, $2 = extra
  local ctx
  ctx="$(prepare "$2" | tail -1)"
  "$CONTAINER" image inspect "$base" >/dev/null 2>&1 || { echo "build.sh: base image $base missing: run build.sh base --arch $arch" >&2; exit 1; }
  "$CONTAINER" build -q --platform "linux/$arch" --build-arg "BASE=$base" -f "$HERE/$1.Containerfile" \
    -t "${tag:-localhost/edgeship-$1:$arch}" "$ctx" >/dev/null
  echo "${tag:-localhost/edgeship-$1:$arch}"
}

case "$what" in
  base) build_base ;;
  agent) image agent agent ;;
  host) image host fleet ;;
  *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
