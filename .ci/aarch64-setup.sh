#!/usr/bin/env bash
# Build an emulated Raspberry Pi 4 (64-bit Raspberry Pi OS-like: Debian bookworm arm64, Python 3.11)
# userland for qemu-user, plus the agent's real aarch64 wheels. See ../shared/notes/aarch64-emulation.md.
# Usage: .ci/aarch64-setup.sh DEST   (creates DEST/root and DEST/site; idempotent)
set -euo pipefail
DEST=${1:?usage: aarch64-setup.sh DEST}
ROOT="$DEST/root"; SITE="$DEST/site"
TOOLS=(pytest==9.0.3 pluggy==1.6.0 iniconfig packaging pygments)  # to run the device tests in this userland
if [ -f "$DEST/.ready-3" ]; then  # bump the marker when the wheel list changes
  # Added later: pure-Python test tools, installed beside a userland others may be using (no rebuild).
  [ -f "$DEST/.tools-1" ] || { python3 -m pip install -q --no-deps --only-binary=:all: --target "$SITE" \
    "${TOOLS[@]}" && touch "$DEST/.tools-1"; }
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! dpkg --print-foreign-architectures | grep -q arm64; then dpkg --add-architecture arm64; fi
apt-get update -qq
if ! command -v qemu-aarch64-static >/dev/null; then apt-get install -y -qq qemu-user-static >/dev/null; fi
rm -rf "$DEST"; mkdir -p "$ROOT" "$SITE" "$DEST/debs"
pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances python3.11:arm64 libstdc++6:arm64 | grep -E '^[a-z0-9].*:arm64$' | sort -u \
        | grep -v -E '^(dpkg|tar|install-info|perl-base|debconf)(:|$)')
(cd "$DEST/debs" && apt-get download $pkgs media-types libtirpc-common readline-common >/dev/null 2>&1 || \
  apt-get download $pkgs media-types libtirpc-common readline-common)
for d in "$DEST"/debs/*.deb; do dpkg-deb -x "$d" "$ROOT"; done
mkdir -p "$ROOT/proc"
: > "$ROOT/proc/cpuinfo"
for i in 0 1 2 3; do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >> "$ROOT/proc/cpuinfo"
done
printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n' >> "$ROOT/proc/cpuinfo"
PLAT=(--platform manylinux2014_aarch64)
for n in $(seq 17 36); do PLAT+=(--platform "manylinux_2_${n}_aarch64"); done
python3 -m pip install -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  "${PLAT[@]}" --target "$SITE" numpy==2.4.6 ai-edge-litert==2.3.0 onnxruntime==1.32.0 paho-mqtt==2.2.0 zstandard==0.25.0 \
  click==8.4.0 cryptography==48.0.0 h11==0.16.0 cffi flatbuffers protobuf coloredlogs humanfriendly sympy mpmath packaging pycparser
python3 -m pip install -q --no-deps --only-binary=:all: --target "$SITE" "${TOOLS[@]}"
QEMU_CPU=cortex-a72 QEMU_LD_PREFIX="$ROOT" qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11" \
  -m compileall -q -j0 "$ROOT/usr/lib/python3.11" >/dev/null 2>&1 || true
touch "$DEST/.ready-3" "$DEST/.tools-1"
