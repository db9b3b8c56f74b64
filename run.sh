#!/usr/bin/env bash
# Set up everything and start the app on http://127.0.0.1:8501 (localhost only by default).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
scripts/ocr.sh || echo "OCR (tesseract) is not available: scanned pages will be reported, not read."
exec .venv/bin/python -m app.launch "$@"
