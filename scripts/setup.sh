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
    if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req" > .venv/pip.log 2>&1; then
        grep -v "is neither a file nor a directory" .venv/pip.log >&2
        echo "Installing $req failed (full log: .venv/pip.log)." >&2
        exit 1
    fi
    touch "$stamp"
fi
