#!/usr/bin/env bash
# Builds what `make test-aarch64` runs on: an arm64 Debian 12 sysroot holding CPython 3.11 and a folder
# of unzipped aarch64 wheels, under CACHE (default .cache/aarch64). All downloads happen here; the
# check itself (scripts/aarch64/check.py) fetches nothing.
#
# Why by hand: this machine kind has no binfmt_misc, so a debootstrap chroot cannot exec arm64 binaries.
# qemu-aarch64-static is called directly with -L SYSROOT (the dynamic loader and libraries come from
# there), and pip refuses to install foreign-platform wheels, so the wheels are downloaded for the
# target platform and unzipped (a wheel is a zip) into one folder put on PYTHONPATH.
set -euo pipefail

CACHE=${1:-.cache/aarch64}
# Under Debian 12's qemu 7.2, onnxruntime 1.19.2-1.27.0 aarch64 import and run; 1.28.0 and later
# segfault at import (any -cpu). A limit of the emulator: real devices use the current release.
ORT_VERSION=${ORT_VERSION:-1.27.0}
STAMP="$CACHE/.ready-ort$ORT_VERSION"
[ -f "$STAMP" ] && { echo "aarch64 sysroot ready: $CACHE"; exit 0; }

need_root() { [ "$(id -u)" = 0 ] || { echo "error: $1 needs root: run 'sudo $0'"; exit 1; }; }

if ! command -v qemu-aarch64-static >/dev/null; then
  need_root "installing qemu-user-static"
  apt-get update -q && apt-get install -y -q qemu-user-static
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  need_root "adding the arm64 package architecture"
  dpkg --add-architecture arm64 && apt-get update -q
fi

# CPython 3.11 (Debian 12's) and every shared library it or the wheels' extension modules load.
DEBS=(libc6 libgcc-s1 libstdc++6 python3.11 python3.11-minimal libpython3.11 libpython3.11-minimal
      libpython3.11-stdlib zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1
      libncursesw6 libtinfo6 libreadline8 libdb5.3 libgdbm6 libnsl2 libtirpc3 libcrypt1
      libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1)
rm -rf "$CACHE/debs" "$CACHE/sysroot" "$CACHE/wheels" "$CACHE/site"
mkdir -p "$CACHE/debs" "$CACHE/sysroot" "$CACHE/wheels" "$CACHE/site"
( cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "${DEBS[@]/%/:arm64}" )
for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$CACHE/sysroot"; done

# The device side's dependencies (pyproject's core + device extra) as aarch64 wheels. The x86 .venv's
# versions where an aarch64 cp311 wheel exists, so the two runs differ in the CPU and onnxruntime only.
pip download -q --only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
  --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
  -d "$CACHE/wheels" "onnxruntime==$ORT_VERSION" numpy==2.4.6 pillow==13.0.0 safetensors==0.8.0 \
  typer==0.29.2 tqdm==4.70.1 threadpoolctl==3.8.0
for whl in "$CACHE"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$CACHE/site"; done

touch "$STAMP"
echo "aarch64 sysroot ready: $CACHE"
