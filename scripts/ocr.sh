#!/usr/bin/env bash
# Make Debian's tesseract OCR available, with a language pack for each code of the
# OCR_LANGUAGES setting (tesseract codes joined by "+", default "eng").
# Installs packages only when running as root; otherwise says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The app's own setting (environment or data/settings.toml) when the app is installed.
langs=$(.venv/bin/python -c 'from app.settings import load_settings; print(load_settings().ocr_languages)' 2>/dev/null \
    || echo "${DOCANALYST_OCR_LANGUAGES:-eng}")
packages=(tesseract-ocr)
for code in ${langs//+/ }; do
    packages+=("tesseract-ocr-$(echo "$code" | tr '_' '-' | tr '[:upper:]' '[:lower:]')")
done
installed() {
    command -v tesseract >/dev/null || return 1
    local have
    have=$(tesseract --list-langs 2>/dev/null | tail -n +2)
    for code in ${langs//+/ }; do grep -qx "$code" <<<"$have" || return 1; done
}
installed && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "OCR needs: ${packages[*]} (apt-get install as root)." >&2
    exit 1
fi
apt-get install -y -q "${packages[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${packages[@]}" >/dev/null; }
installed
