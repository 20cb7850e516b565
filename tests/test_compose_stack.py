"""The compose stack run for real: ``bash scripts/compose-test.sh`` builds the image, starts Redis and a worker,
sends messages, kills a worker mid-reply and checks every message ends done exactly once.

Marked ``docker``: not part of the default suite (it takes minutes and needs a Docker daemon, and root where the
local base images must be built); run it with ``bash scripts/test.sh -m docker``. It skips when no daemon
answers, unless COMPOSE_TEST_REQUIRED=1 (CI sets it once it has started a daemon), where it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from worker.testing import PROJECT_ROOT


def docker_missing() -> str | None:
    """Why the stack cannot run here, or None when a daemon and Docker Compose v2 answer."""
    if shutil.which("docker") is None:
        return "no docker client"
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode:
            return "no Docker daemon answers"
        if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode:
            return "Docker Compose v2 (docker compose) is missing"
    except subprocess.TimeoutExpired:
        return "docker did not answer within 30 s"
    return None


@pytest.mark.docker
@pytest.mark.timeout(3600)
def test_the_compose_stack_serves_messages_and_survives_a_killed_worker():
    reason = docker_missing()
    if reason:
        if os.environ.get("COMPOSE_TEST_REQUIRED") == "1":
            pytest.fail(f"COMPOSE_TEST_REQUIRED=1 but {reason}")
        pytest.skip(reason)
    # The script prints each step's time and the figures; pytest shows them when it fails (or always with -s).
    result = subprocess.run(["bash", "scripts/compose-test.sh"], cwd=PROJECT_ROOT)
    assert result.returncode == 0, "scripts/compose-test.sh failed (its output is above)"
