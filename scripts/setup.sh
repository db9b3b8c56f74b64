#!/usr/bin/env bash
# Create .venv and install the project's requirements (dev tools too with "dev").
# Reinstalls only when a requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
files=(requirements.txt)
[ "${1:-}" = "dev" ] && files+=(requirements-dev.txt)
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.installed-$(cat "${files[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    req=requirements.txt
    [ "${1:-}" = "dev" ] && req=requirements-dev.txt
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req" 2>&1 \
        | grep -v "is neither a file nor a directory" || true
    .venv/bin/python -c "import torch, safetensors, tokenizers" 
    touch "$stamp"
fi
