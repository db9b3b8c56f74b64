#!/usr/bin/env bash
# Set up everything (with test tools) and run the whole test suite.
# The storage tests also run against a throwaway PostgreSQL when its server is installed.
# --emulated-cpu (first argument) runs the tests on an emulated CPU without AVX-512 (see
# scripts/emulated-cpu.sh; about ten times slower); other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
python=(.venv/bin/python)
if [ "${1:-}" = --emulated-cpu ]; then
    shift
    python=(scripts/emulated-cpu.sh)
fi
scripts/setup.sh dev
scripts/browser.sh || echo "Chromium is not available: browser tests will be skipped."
scripts/ocr.sh || echo "OCR (tesseract) is not available: scanned pages will be reported, not read."
scripts/emulator.sh || echo "QEMU is not available: the kernels will not be tested on an emulated AVX2-only CPU."
if [ -z "${DOCANALYST_TEST_POSTGRES_URL:-}" ]; then
    pgdir=$(mktemp -d /tmp/docanalyst-pg.XXXXXX)
    trap 'scripts/postgres.sh stop "$pgdir" || true; rm -rf "$pgdir"' EXIT
    if url=$(scripts/postgres.sh start "$pgdir" 2>/dev/null); then
        export DOCANALYST_TEST_POSTGRES_URL=$url
    else
        echo "PostgreSQL server not installed: PostgreSQL storage tests will be skipped."
    fi
fi
"${python[@]}" -m pytest "$@"
