#!/usr/bin/env bash
# Run the project's Python on an emulated CPU without AVX-512 (QEMU user mode, -cpu Haswell: AVX2,
# FMA, F16C), child Python processes included (test workers, the app's server):
#     scripts/emulated-cpu.sh -m pytest tests/test_kernels_linear.py -n 2
# About ten times slower than the host. Needs .venv (scripts/setup.sh dev) and qemu-x86_64
# (scripts/emulator.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
CPU=${EMULATED_CPU:-Haswell}
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 is missing: run scripts/emulator.sh as root." >&2; exit 1; }
[ -x .venv/bin/python ] || { echo ".venv is missing: run scripts/setup.sh dev first." >&2; exit 1; }
interpreter=$(readlink -f .venv/bin/python)
# A virtual environment whose python starts the interpreter under QEMU with argv[0] pointing back at
# itself, so sys.executable (what subprocesses start) is emulated as well.
env_dir=$(mktemp -d /tmp/docanalyst-emulated.XXXXXX)
trap 'rm -rf "$env_dir"' EXIT
mkdir "$env_dir/bin"
cp .venv/pyvenv.cfg "$env_dir/"
ln -s "$PWD/.venv/lib" "$env_dir/lib"
cat > "$env_dir/bin/python" <<WRAPPER
#!/bin/sh
exec qemu-x86_64 -cpu $CPU -0 "\$0" "$interpreter" "\$@"
WRAPPER
chmod +x "$env_dir/bin/python"
# Tests that measure the process itself (its memory maps, its speed) skip on seeing this.
export DOCANALYST_EMULATED_CPU=$CPU
# QEMU warns once per process about host CPUID bits it does not model; the rest of stderr is kept.
"$env_dir/bin/python" "$@" 2> >(grep --line-buffered -v "TCG doesn't support requested feature" >&2)
