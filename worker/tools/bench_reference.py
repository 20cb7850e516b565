"""llama.cpp on the same GGUF, the same prompt, the same threads: what a user would run instead of the worker.

Runs in its own interpreter (``python -m worker.bench --reference``), so its memory is measured alone and the
benchmark's own peak RSS stays the worker's. Its rounds interleave with the worker's own decode rounds (the child
waits between them): on a shared machine a neighbour's burst then slows both sides of a pair alike, and the bench
reports the median of the paired ratios. Needs ``llama-cpp-python`` (the optional ``reference`` extra, never a
dependency of the worker); without it, or for a model that is not a GGUF, every figure is None.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import tempfile
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
    """Child process: load the GGUF with llama.cpp and say ``ready``; then, for every ``round`` line on stdin,
    decode ``tokens`` greedy tokens after ``prompt`` and print that round's figures; at ``end`` (or end of input)
    print the load time and peak RSS. Between rounds it waits on stdin and uses no CPU: the parent times its own
    decode in between, so both see the machine in the same minute."""
    from llama_cpp import Llama

    req = json.loads(request_json)
    t0 = time.perf_counter()
    llm = Llama(model_path=req["gguf"], n_threads=req["threads"], n_threads_batch=req["threads"], n_ctx=2048,
                verbose=False)
    load = time.perf_counter() - t0
    ids = llm.tokenize(req["prompt"].encode(), add_bos=False, special=True)
    _say({"ready": True})
    for line in sys.stdin:
        if line.strip() != "round":
            break
        times = []
        llm.reset()  # or generate() reuses the previous round's prompt cache
        t0 = time.perf_counter()
        # greedy (temp 0), no stop: exactly as many tokens as the worker's timed reply
        for n, _tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)):
            times.append(time.perf_counter())
            if n + 1 >= req["tokens"]:
                break
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        _say({"tokens_per_second": rate, "first_token_seconds": times[0] - t0})
    _say({"reference_load_seconds": load, "reference_peak_rss_bytes": peak_rss_bytes()})


def _exit_reason(code: int) -> str:
    """A child's return code in words: a crash inside llama.cpp shows as a signal (ggml's AMX kernels faulted with
    SIGSEGV on a virtual machine that has AMX; a build without them runs, docs/benchmark.md)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


class Reference:
    """llama.cpp for ``gguf`` in a child interpreter, decoding one round whenever :meth:`round` is called, so the
    bench can interleave its rounds with the worker's. Every figure is None when it cannot run here (no
    ``llama-cpp-python``, not a GGUF, the child failed)."""

    def __init__(self, gguf: str, prompt: str, threads: int, tokens: int, timeout: float = 900) -> None:
        self.timeout = timeout
        self.rounds: list[dict[str, float]] = []
        self.proc: subprocess.Popen[str] | None = None
        if Path(gguf).suffix != ".gguf" or not Path(gguf).is_file() or not available():
            return
        req = json.dumps({"gguf": gguf, "prompt": prompt, "threads": threads, "tokens": tokens})
        # stderr to a file, not a pipe: a pipe nobody reads between rounds would block the child once it filled.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.bench", "--reference", req], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self._read()

    def round(self) -> float | None:
        """One round of llama.cpp's decode: its tokens/s, or None."""
        got = self._ask("round")
        if got is None:
            return None
        self.rounds.append(got)
        return got["tokens_per_second"]

    def finish(self) -> dict[str, Any]:
        """The best round's rate and first-token time, the load time and the child's peak RSS (KEYS)."""
        out: dict[str, Any] = dict.fromkeys(KEYS)
        proc, last = self.proc, self._ask("end")
        if proc is not None:
            proc.wait(timeout=60)
        if last is None or not self.rounds:
            return out
        return {
            "reference_tokens_per_second": max(r["tokens_per_second"] for r in self.rounds),
            "reference_first_token_seconds": min(r["first_token_seconds"] for r in self.rounds),
            **last,
        }

    def _ask(self, line: str) -> dict[str, Any] | None:
        """Send the child one line and read its answer (None once it has failed)."""
        if self.proc is None:
            return None
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any] | None:
        """The child's next line as JSON; None (and the child stopped, its stderr shown) when it fails or hangs."""
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip():
            return dict(json.loads(line))
        self.proc.kill()
        self.stderr.seek(0)
        print(f"llama.cpp reference failed ({'timed out' if not ready else _exit_reason(self.proc.wait())}): "
              f"{self.stderr.read()[-1000:]}", file=sys.stderr)
        self.proc = None
        return None
