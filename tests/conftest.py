from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from worker.testing import RedisServer, WorkerProcess, build_tiny_model, redis_answers, worker_env

TEST_DB = 13  # the machine's Redis keeps db 0 for people; tests own this one and flush it
# Read before the environment is cleared below: it names the database these tests may flush.
TEST_REDIS_URL = os.environ.get("ALLINONE_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{TEST_DB}")

# Tests never read the user's environment by accident, and never reach for the hub.
for _k in [k for k in os.environ if k.startswith("ALLINONE_")]:
    del os.environ[_k]
# The dequantisation threshold is timed at load on a real worker; tests pin it so that which path a call takes
# (and its rounding) never depends on how busy the machine was (tests/test_quant.py times it on purpose).
os.environ["ALLINONE_DEQUANT_ROWS"] = "128"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with wider weights: at the default init its greedy reply repeats one token; here every token
    depends on the numbers (tests of the decode: batched = single, compiled = eager)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-lively"), init_std=0.3)


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from worker.settings import Settings

    return Settings(
        model=str(tiny_model_dir),
        dtype="float32",
        do_sample=False,
        max_new_tokens=8,
        threads=1,
        cache_dir=tmp_path_factory.mktemp("cache"),
    )


@pytest.fixture(scope="session")
def tiny_engine(tiny_settings):
    from worker.engine import Engine

    engine = Engine(tiny_settings)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    """A real Redis: ALLINONE_TEST_REDIS_URL, else the local one (db 13), else one started here on its own port.

    Outside CI a missing redis-server skips the tests that need it; in CI (CI=true) it fails them.
    """
    url = TEST_REDIS_URL
    if redis_answers(url):
        yield url
        return
    try:
        server = RedisServer().start()
    except RuntimeError as e:
        if os.environ.get("CI"):
            pytest.fail(f"no Redis for integration tests: {e}")
        pytest.skip(f"no Redis for integration tests: {e}")
    try:
        yield server.url.rsplit("/", 1)[0] + f"/{TEST_DB}"
    finally:
        server.stop()


@pytest.fixture()
def redis_url(redis_base_url: str) -> Iterator[str]:
    """The test Redis database, empty before and after the test."""
    client = redis.Redis.from_url(redis_base_url)
    client.flushdb()
    yield redis_base_url
    client.flushdb()


@pytest.fixture(scope="module")
def tiny_worker(redis_base_url, tiny_model_dir, tmp_path_factory) -> Iterator[WorkerProcess]:
    """A real ``python -m worker`` on the tiny model, for one test module; the test database is flushed before
    and after the module (tests inside use their own conversation ids)."""
    client = redis.Redis.from_url(redis_base_url)
    client.flushdb()
    env = worker_env(redis_base_url, str(tiny_model_dir), tmp_path_factory.mktemp("cache"))
    worker = WorkerProcess(env=env, log_path=tmp_path_factory.mktemp("logs") / "worker.log").start()
    yield worker
    worker.stop()
    client.flushdb()


@pytest.fixture()
def server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, on its own port: a test may stop, restart or fill it as it likes."""
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture()
def make_worker(server, tiny_model_dir, tmp_path):
    """``make(name="w", **env)``: a real worker on the tiny model against ``server`` (not started: ``.start()``);
    every worker made is killed at the end of the test."""
    workers: list[WorkerProcess] = []

    def make(name: str = "w", **env: str) -> WorkerProcess:
        e = worker_env(server.url, str(tiny_model_dir), tmp_path / "cache", **env)
        w = WorkerProcess(env=e, log_path=tmp_path / f"{name}-{len(workers)}.log")
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.kill()
