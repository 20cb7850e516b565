"""The chaos run at a CI size: kills and a Redis restart while messages flow; nothing lost, twice, or out of order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from worker.testing import PROJECT_ROOT

pytestmark = pytest.mark.integration


def test_chaos_run_loses_nothing_and_duplicates_nothing():
    out = subprocess.run(
        [sys.executable, "scripts/chaos.py", "--messages", "60", "--conversations", "6", "--kills", "3",
         "--redis-restarts", "1", "--visibility", "5", "--rate", "20", "--timeout", "300"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["kills"] == 3 and report["redis_restarts"] == 1
    assert {k: report[k] for k in ("lost", "duplicated", "out_of_order", "failed", "wrong_context", "unlabelled")} \
        == dict.fromkeys(("lost", "duplicated", "out_of_order", "failed", "wrong_context", "unlabelled"), 0), report
    assert out.returncode == 0
