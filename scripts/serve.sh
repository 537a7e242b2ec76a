#!/usr/bin/env bash
# Install SafePACS, create its data directory on first run, and serve on the embedded default
# (SQLite index, encrypted local object store, DICOM on 127.0.0.1:11112, AE title SAFEPACS,
# DICOMweb on https://127.0.0.1:8443/dicomweb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
data="${SAFEPACS_DATA:-./safepacs-data}"
if [ ! -d "$data" ]; then
  .venv/bin/safepacs init --data "$data"
fi
exec .venv/bin/safepacs serve --data "$data" "$@"
