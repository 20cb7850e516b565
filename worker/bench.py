"""``python -m worker.bench``: how fast the worker is on this machine (lives in ``worker.tools.bench``)."""

from __future__ import annotations

import sys

from worker.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
