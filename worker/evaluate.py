"""``python -m worker.evaluate``: sentiment accuracy against labelled messages (lives in ``worker.tools.evaluate``)."""

from __future__ import annotations

import sys

from worker.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
