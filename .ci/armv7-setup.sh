#!/usr/bin/env bash
# Build an emulated Raspberry Pi 3 / Zero 2 W (32-bit Raspberry Pi OS-like: Debian bookworm armhf,
# Python 3.11) userland for qemu-user. NumPy comes from Debian (python3-numpy 1.24, what 32-bit Pi OS
# ships: PyPI has no armv7l NumPy wheels), tflite-runtime 2.14.0 from its cp311 armv7l wheel; cffi and
# zstandard from Debian too (no armv7l wheels). See ../shared/notes/armv7-emulation.md.
# Usage: .ci/armv7-setup.sh DEST   (creates DEST/root and DEST/site; idempotent)
set -euo pipefail
DEST=${1:?usage: armv7-setup.sh DEST}
ROOT="$DEST/root"; SITE="$DEST/site"
[ -f "$DEST/.ready-2" ] && exit 0  # bump the marker when the package or wheel list changes
export DEBIAN_FRONTEND=noninteractive
if ! dpkg --print-foreign-architectures | grep -q armhf; then dpkg --add-architecture armhf; fi
# One index can fail transiently ("Mirror sync in progress"); the download below says if it matters.
apt-get update -qq || true
if ! command -v qemu-arm-static >/dev/null; then apt-get install -y -qq qemu-user-static >/dev/null; fi
rm -rf "$DEST"; mkdir -p "$ROOT" "$SITE" "$DEST/debs"
pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances python3.11:armhf python3-numpy:armhf libstdc++6:armhf python3-cffi-backend:armhf \
        python3-zstandard:armhf | grep -E '^[a-z0-9].*:armhf$' | sort -u \
        | grep -v -E '^(dpkg|tar|install-info|perl-base|debconf)(:|$)')
(cd "$DEST/debs" && apt-get download $pkgs media-types libtirpc-common readline-common >/dev/null 2>&1 || \
  apt-get download $pkgs media-types libtirpc-common readline-common)
for d in "$DEST"/debs/*.deb; do dpkg-deb -x "$d" "$ROOT"; done
# dpkg-deb -x runs no maintainer scripts: do what update-alternatives would for BLAS/LAPACK.
LIB="$ROOT/usr/lib/arm-linux-gnueabihf"
ln -sf blas/libblas.so.3 "$LIB/libblas.so.3"
ln -sf lapack/liblapack.so.3 "$LIB/liblapack.so.3"
mkdir -p "$ROOT/proc"
: > "$ROOT/proc/cpuinfo"  # a Raspberry Pi 3 (Cortex-A53 in 32-bit mode), not the host's x86 cpuinfo
for i in 0 1 2 3; do
  printf 'processor\t: %d\nmodel name\t: ARMv7 Processor rev 4 (v7l)\nBogoMIPS\t: 38.40\nFeatures\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32\nCPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x0\nCPU part\t: 0xd03\nCPU revision\t: 4\n\n' "$i" >> "$ROOT/proc/cpuinfo"
done
printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 3 Model B Plus Rev 1.3\n' >> "$ROOT/proc/cpuinfo"
PLAT=()
for n in $(seq 17 36); do PLAT+=(--platform "manylinux_2_${n}_armv7l"); done
python3 -m pip install -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  "${PLAT[@]}" --target "$SITE" tflite-runtime==2.14.0
python3 -m pip install -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp --abi abi3 \
  "${PLAT[@]}" --target "$SITE" --upgrade cryptography==48.0.0
# Pure-Python: the agent's MQTT client, CLI and HTTP/1.1 (h11), and pytest to run the device tests here.
python3 -m pip install -q --no-deps --only-binary=:all: --target "$SITE" --upgrade \
  paho-mqtt==2.2.0 click==8.4.0 h11==0.16.0 pycparser pytest==9.0.3 pluggy==1.6.0 iniconfig packaging pygments
QEMU_LD_PREFIX="$ROOT" qemu-arm-static -L "$ROOT" "$ROOT/usr/bin/python3.11" \
  -m compileall -q -j0 "$ROOT/usr/lib/python3.11" "$ROOT/usr/lib/python3/dist-packages" >/dev/null 2>&1 || true
touch "$DEST/.ready-2"
