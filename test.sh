#!/usr/bin/env bash
# Set up everything (with test tools) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh dev
exec .venv/bin/python -m pytest "$@"
