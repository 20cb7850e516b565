"""What the benchmark measures around the model: the machine (CPU name, memory bandwidth), this process's peak
memory, and loads in a fresh interpreter (``python -m worker.bench --probe``), so a load finds nothing in memory.
"""

from __future__ import annotations

import gc
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BANDWIDTH_BYTES = 512 * 2**20
# The benchmark's own messages, both languages: measured when no message file is found, and, lengthened, the
# probe's sentiment batch (the worker's largest activations).
FALLBACK_MESSAGES = (
    "酒店位置很好，服务热情，房间干净，下次还会再来。",
    "The plot is thin and the jokes fall flat.",
    "电池续航太差了，用了两个月就坏了，不推荐购买。",
    "A warm, funny and beautifully acted film.",
    "书的内容很充实，作者的观点很有启发性。",
    "Two hours of my life I will never get back.",
    "房间隔音很差，晚上很吵，早餐也一般。",
    "It is the best thing the director has ever made.",
)
REPLY_PROMPT = "请用两三句话介绍一下你自己，再说说你能帮我做什么。"


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident memory.

    ``VmHWM`` belongs to the process's own address space, which exec replaces; ``getrusage``'s maxrss survives
    exec, so a probe started from the loaded benchmark would report the benchmark's memory (seen: 1.6 GiB for
    llama.cpp's 0.6)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """Bytes per second a reduction streams from memory with torch's threads: the rate decode reads weights at.

    The tensor is freed (and unmapped) on return; the worker-like peak RSS is measured in its own process."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    del x
    gc.collect()
    return nbytes / best


def probe_main(settings_json: str, work: bool) -> None:
    """Child process: load the engine (and with ``work``, run a batch of sentiment and a short reply); print JSON."""
    from worker.engine import Engine
    from worker.settings import Settings

    s = Settings.model_validate_json(settings_json)
    t0 = time.perf_counter()
    engine = Engine(s)
    report = engine.load()
    out: dict[str, Any] = {"load": report.as_dict(), "wall_seconds": time.perf_counter() - t0}
    try:  # from the process's start: interpreter, imports and load, what a restarted worker waits
        import psutil

        out["wall_seconds"] = time.time() - psutil.Process().create_time()
    except Exception:  # pragma: no cover - psutil missing
        pass
    if work:
        texts = [m * 20 for m in FALLBACK_MESSAGES]
        texts = (texts * (s.sentiment_batch_size // len(texts) + 1))[: s.sentiment_batch_size]
        engine.classify(texts)
        engine.reply([("你好", "你好！有什么可以帮你？")], REPLY_PROMPT)
    out["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(out))


def run_probe(settings: Any, work: bool = False, timeout: float = 1800) -> dict[str, Any]:
    """Run ``probe_main`` in a fresh interpreter: a load that finds no module or file already in memory."""
    cmd = [sys.executable, "-m", "worker.bench", "--probe", settings.model_dump_json()]
    if work:
        cmd.append("--probe-work")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load probe failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def converted_cache_exists(settings: Any) -> bool | None:
    """Whether the GGUF's converted weights are cached; None when the model is not a GGUF (nothing to convert)."""
    from worker.engine import converted_cache_path

    cached = converted_cache_path(settings)
    return None if cached is None else (cached / "config.json").is_file()
