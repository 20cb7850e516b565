"""``python -m worker.train_head``: train a sentiment head for the model (lives in ``worker.tools.train_head``)."""

from __future__ import annotations

import sys

from worker.tools.train_head import main

if __name__ == "__main__":
    sys.exit(main())
