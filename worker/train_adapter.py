"""``python -m worker.train_adapter``: train a sentiment adapter for the model (lives in
``worker.tools.train_adapter``)."""

from __future__ import annotations

import sys

from worker.tools.train_adapter import main

if __name__ == "__main__":
    from worker.engine import cpu

    cpu.keep_freed_memory()  # a training process reuses each step's buffers (why: its docstring)
    sys.exit(main())
