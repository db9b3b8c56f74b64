#!/usr/bin/env bash
# Make Debian's Chromium available for the browser tests (Playwright drives it; it never
# downloads a browser of its own). Installs the package only when running as root.
set -euo pipefail
command -v chromium >/dev/null && exit 0
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || exit 1
(apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; })
command -v chromium >/dev/null
