#!/usr/bin/env bash
# The test suite, set up from nothing. Extra arguments go to pytest (e.g. `-m slow` for the real-model checks).
# Integration tests use a real Redis: ALLINONE_TEST_REDIS_URL, else 127.0.0.1:6379 db 13, else one they start.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${ALLINONE_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest "$@"
