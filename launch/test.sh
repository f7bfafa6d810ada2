#!/usr/bin/env bash
# Install moss-train with its test extras into .venv and run the test suite.
# Extra arguments go to pytest (e.g. ./launch/test.sh -k model, ./launch/test.sh --runslow).
set -euo pipefail
cd "$(dirname "$0")/.."
MOSS_EXTRAS=${MOSS_EXTRAS:-test} ./launch/setup_env.sh
exec "${MOSS_VENV:-.venv}/bin/python" -m pytest "$@"
