#!/usr/bin/env bash
# Create .venv and install SafePACS into it (with the test extras when given "test").
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "SafePACS needs Python 3.11 or newer (python3 is $(python3 --version 2>&1))." >&2; exit 2
fi
if [ ! -x .venv/bin/python ]; then
  if ! python3 -m venv .venv 2>/dev/null; then
    rm -rf .venv
    echo "Installing Debian's python3-venv (needed to create .venv)..." >&2
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ "${1:-}" = test ]; then
  .venv/bin/python -m pip install -q -e '.[test]'
else
  .venv/bin/python -m pip install -q -e .
fi
# The OHIF viewer the web UI serves at /viewer: fetched with npm and checked against its pinned integrity.
# Optional: without npm (or when the download fails) the UI's built-in viewer still works.
if command -v npm >/dev/null 2>&1; then
  .venv/bin/safepacs viewer install || echo "The OHIF viewer was not installed (see above); the built-in viewer still works. Retry with: .venv/bin/safepacs viewer install" >&2
else
  echo "The OHIF viewer was not installed (no npm): install npm (e.g. apt-get install npm), then run .venv/bin/safepacs viewer install; the built-in viewer works without it." >&2
fi
