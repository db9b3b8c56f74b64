#!/usr/bin/env bash
# Make QEMU's user-mode emulator (Debian's qemu-user) available: the tests run the kernels' AVX2
# builds on an emulated CPU without AVX-512 (-cpu Haswell) as well as on this one.
# Installs the package only when running as root; otherwise says what is missing.
set -euo pipefail
[ "$(uname -m)" = x86_64 ] || exit 0
command -v qemu-x86_64 >/dev/null && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "The emulated-CPU test needs qemu-user (apt-get install as root)." >&2
    exit 1
fi
apt-get install -y -q qemu-user >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q qemu-user >/dev/null; }
command -v qemu-x86_64 >/dev/null
