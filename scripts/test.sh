#!/usr/bin/env bash
# Install everything the tests need (DCMTK, Orthanc and Chromium from Debian, Python packages) and run the
# whole suite: lint, type check, tests.  PostgreSQL tests run when SAFEPACS_TEST_POSTGRES is set,
# e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v storescu >/dev/null || ! command -v Orthanc >/dev/null \
  || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ ! -x /usr/lib/chromium/chromium ]; then
  echo "Installing DCMTK, Orthanc (with its DICOMweb plugin) and Chromium (for the web UI's tests) from Debian..." >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk orthanc orthanc-dicomweb chromium >/dev/null
fi
bash scripts/install.sh test
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
