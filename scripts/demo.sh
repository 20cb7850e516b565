#!/usr/bin/env bash
# The demo, set up from nothing: see scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${ALLINONE_VENV:-.venv}/bin/activate"
exec python scripts/demo.py "$@"
