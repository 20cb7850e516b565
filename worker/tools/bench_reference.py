"""llama.cpp on the same GGUF, the same prompt, the same threads: what a user would run instead of the worker.

Runs in its own interpreter (``python -m worker.bench --reference``), so its memory is measured alone and the
benchmark's own peak RSS stays the worker's. Needs ``llama-cpp-python`` (the optional ``reference`` extra, never a
dependency of the worker); without it, or for a model that is not a GGUF, every figure is None.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.tools.bench_probes import peak_rss_bytes

KEYS = ("reference_tokens_per_second", "reference_first_token_seconds", "reference_load_seconds",
        "reference_peak_rss_bytes")


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def reference_main(request_json: str) -> None:
    """Child process: load the GGUF with llama.cpp, decode ``tokens`` greedy tokens after ``prompt``; print JSON."""
    from llama_cpp import Llama

    req = json.loads(request_json)
    t0 = time.perf_counter()
    llm = Llama(model_path=req["gguf"], n_threads=req["threads"], n_threads_batch=req["threads"], n_ctx=2048,
                verbose=False)
    load = time.perf_counter() - t0
    ids = llm.tokenize(req["prompt"].encode(), add_bos=False, special=True)
    best_rate, best_first = 0.0, float("inf")
    for _ in range(req["rounds"]):
        times = []
        llm.reset()  # or generate() reuses the previous round's prompt cache
        t0 = time.perf_counter()
        # greedy (temp 0), no stop: exactly as many tokens as the worker's timed reply
        for n, _tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)):
            times.append(time.perf_counter())
            if n + 1 >= req["tokens"]:
                break
        best_first = min(best_first, times[0] - t0)
        if len(times) > 1:
            best_rate = max(best_rate, (len(times) - 1) / (times[-1] - times[0]))
    print(json.dumps({
        "reference_tokens_per_second": best_rate,
        "reference_first_token_seconds": best_first,
        "reference_load_seconds": load,
        "reference_peak_rss_bytes": peak_rss_bytes(),
    }))


def measure(gguf: str, prompt: str, threads: int, tokens: int, rounds: int, timeout: float = 900) -> dict[str, Any]:
    """llama.cpp's figures for ``gguf`` in a fresh interpreter; all None when it cannot run here."""
    if Path(gguf).suffix != ".gguf" or not Path(gguf).is_file() or not available():
        return dict.fromkeys(KEYS)
    req = json.dumps({"gguf": gguf, "prompt": prompt, "threads": threads, "tokens": tokens, "rounds": rounds})
    proc = subprocess.run([sys.executable, "-m", "worker.bench", "--reference", req], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        print(f"llama.cpp reference failed ({proc.returncode}): {proc.stderr[-1000:]}", file=sys.stderr)
        return dict.fromkeys(KEYS)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
