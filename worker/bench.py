"""``python -m worker.bench``: how fast the worker is on this machine, measured in one run on the same messages.

Every number of one report comes from one process on one machine, so only its ratios mean something: timings move
by tens of percent between runs on a shared machine. What it measures:

1. naive: the reference recipe — ``generate(max_new_tokens=10)`` over the whole sentiment prompt, then a substring
   search for a label word in the answer — one message at a time;
2. single: the product's sentiment path (cached prompt prefix, two LM-head rows), one message at a time;
3. bulk: the same path on right-padded, length-sorted batches;
4. reply: time to first token and greedy decode rate of a reply of ``--reply-tokens`` tokens;
5. load: cold (GGUF conversion; only when no converted cache exists, or with ``--cold``) and warm (from the cache),
   each in a fresh subprocess, and the peak RSS of a worker-like process (load, a batch of sentiment, a reply);
6. memory bandwidth (a sum over a tensor far larger than the caches) and the decode rate it allows: decoding one
   token reads every weight once, so bandwidth / weights bytes is a ceiling no implementation beats.

It also checks that the speed costs no accuracy: the fast scores of every measured message against the plain,
uncached, unbatched forward pass (``Engine.score_plain``). Accuracy against labels is ``python -m worker.evaluate``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(os.environ.get("ALLINONE_DATA_DIR", "/work/shared/data"))
DEFAULT_MESSAGE_FILES = (DATA_DIR / "sentiment-zh.dev.jsonl", DATA_DIR / "sentiment-en.dev.jsonl")
# Used when the dev files are absent, so the benchmark runs anywhere.
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
BANDWIDTH_BYTES = 512 * 2**20


# ----------------------------------------------------------------------------------------------- inputs
def load_messages(files: list[Path], n: int) -> list[str]:
    """``n`` texts taken in turn from each file (zh, en, zh, en...), so every run measures the same mix."""
    per_file: list[list[str]] = []
    for f in files:
        if f.is_file():
            with f.open(encoding="utf-8") as fh:
                per_file.append([json.loads(line)["text"] for line in fh if line.strip()])
    if not per_file:
        per_file = [list(FALLBACK_MESSAGES)]
    out: list[str] = []
    i = 0
    while len(out) < n and any(i < len(texts) for texts in per_file):
        out.extend(texts[i] for texts in per_file if i < len(texts))
        i += 1
    return out[:n]


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident memory (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------- probes
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


def _probe_main(settings_json: str, work: bool) -> None:
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
        # The longest dev-like messages at the configured batch size: the worker's largest sentiment activations.
        texts = [m * 20 for m in FALLBACK_MESSAGES]
        texts = (texts * (s.sentiment_batch_size // len(texts) + 1))[: s.sentiment_batch_size]
        engine.classify(texts)
        engine.reply([("你好", "你好！有什么可以帮你？")], REPLY_PROMPT)
    out["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(out))


def run_probe(settings: Any, work: bool = False, timeout: float = 1800) -> dict[str, Any]:
    """Run ``_probe_main`` in a fresh interpreter: a load that finds no module or file already in memory."""
    cmd = [sys.executable, "-m", "worker.bench", "--probe", settings.model_dump_json()]
    if work:
        cmd.append("--probe-work")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load probe failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------------------------------------- paths
def naive_label(engine: Any, text: str, max_new_tokens: int = 10) -> str:
    """The reference recipe: render the whole prompt, generate a few tokens greedily, look for a label word."""
    import torch

    from worker import prompts

    tok = engine.tokenizer
    enc = tok.apply_chat_template(
        prompts.sentiment_messages(text, engine.few_shot),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).lower()
    found = [(answer.find(w.lower()), label) for w, label in zip(prompts.LABEL_WORDS, prompts.LABELS, strict=True)]
    found = [(pos, label) for pos, label in found if pos >= 0]
    return min(found)[1] if found else "unknown"


class _TokenClock:
    """A generate() streamer that only notes when each token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class ReplyTiming:
    prompt_tokens: int
    new_tokens: int
    first_token_seconds: float
    decode_tokens_per_second: float
    loop_tokens_per_second: float


def time_reply(engine: Any, new_tokens: int) -> ReplyTiming:
    """Time to first token and decode rate of a greedy reply forced to ``new_tokens`` tokens.

    Also decodes the same number of tokens with a bare forward loop (no logits processors, no stopping
    criteria): the gap between the two is generate()'s own overhead."""
    import torch

    ids, _ = engine.reply_prompt_ids([], REPLY_PROMPT)
    clock = _TokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=engine.tokenizer.pad_token_id,
            streamer=clock,
        )
    n = int(out.shape[1] - ids.shape[1])
    first = clock.times[1] - t0
    rate = (n - 1) / (clock.times[-1] - clock.times[1]) if n > 1 else 0.0

    # The floor: prefill, then one forward per token on the growing cache, argmax in between.
    kw = engine._cache_kw  # "cache" in transformers 5, "past_key_values" before
    with torch.inference_mode():
        res = engine.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = res.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            res = engine.model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kw: getattr(res, kw)})
            nxt = res.logits[:, -1:].argmax(-1)
        loop_rate = (new_tokens - 1) / (time.perf_counter() - t1) if new_tokens > 1 else 0.0
    return ReplyTiming(int(ids.shape[1]), n, first, rate, loop_rate)


# ----------------------------------------------------------------------------------------------- the run
def converted_cache_exists(settings: Any) -> bool | None:
    """Whether the GGUF's converted weights are cached; None when the model is not a GGUF (nothing to convert)."""
    from worker.engine import gguf_cache_dir

    path = Path(settings.model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        return None
    dtype = "float32" if settings.quantize == "int8" else settings.resolved_dtype()  # as Engine.load() decides
    return (gguf_cache_dir(path, settings.cache_dir.expanduser(), dtype) / "config.json").is_file()


def run(settings: Any, texts: list[str], cold: bool = False, reply_tokens: int = 64, rounds: int = 2) -> dict[str, Any]:
    import torch

    from worker.engine import Engine
    from worker.schemas import Sentiment

    torch.set_num_threads(settings.threads)
    bandwidth = measure_bandwidth()

    # Loads first, each in a fresh process. Cold only when it is free (nothing cached yet, and it fills the
    # cache the warm load then reads) or asked for (then into a throw-away cache: the real one stays).
    cold_seconds = None
    cached = converted_cache_exists(settings)
    if cached is False:
        cold_seconds = run_probe(settings)["load"]["seconds"]
    elif cached and cold:
        with tempfile.TemporaryDirectory(prefix="allinone-cold-") as tmp:
            cold_seconds = run_probe(settings.model_copy(update={"cache_dir": Path(tmp)}))["load"]["seconds"]
    warm = run_probe(settings, work=True)

    engine = Engine(settings)
    report = engine.load()
    n = len(texts)

    # Warm-up: the first call of each shape builds kernels and allocator pools; nobody's steady state.
    naive_label(engine, texts[0])
    engine.classify(texts[:1])
    engine.classify(texts[: settings.sentiment_batch_size])

    # Every path on the same messages, round after round, keeping each path's best round: a neighbour's burst
    # on a shared machine then slows one round of one path, not the ratio.
    naive_s = single_s = bulk_s = plain_s = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        naive = [naive_label(engine, t) for t in texts]
        naive_s = min(naive_s, time.perf_counter() - t0)

        t0 = time.perf_counter()
        single = [engine.classify([t])[0] for t in texts]
        single_s = min(single_s, time.perf_counter() - t0)

        t0 = time.perf_counter()
        bulk = engine.classify(texts)
        bulk_s = min(bulk_s, time.perf_counter() - t0)

        t0 = time.perf_counter()
        plain = [engine.score_plain(t) for t in texts]
        plain_s = min(plain_s, time.perf_counter() - t0)

    # Agreement of the fast path with the plain forward pass, message by message.
    fast_scores = engine.score(texts)
    plain_p = torch.cat([p.p_positive for p in plain])
    plain_logits = torch.cat([p.label_logits for p in plain])
    fast_labels = [s.label for s in bulk]
    plain_labels = [Sentiment.from_p_positive(p).label for p in plain_p.tolist()]
    single_labels = [s.label for s in single]
    # Only where no sentiment head is configured do the labels come from the prompt scores compared here.
    agreement = {
        "labels_fast_vs_plain": sum(a == b for a, b in zip(fast_labels, plain_labels, strict=True)) / n,
        "labels_single_vs_bulk": sum(a == b for a, b in zip(single_labels, fast_labels, strict=True)) / n,
        "labels_naive_vs_fast": sum(a == b for a, b in zip(naive, fast_labels, strict=True)) / n,
        "naive_unparsed": sum(a == "unknown" for a in naive) / n,
        "max_abs_p_positive_diff": float((fast_scores.p_positive - plain_p).abs().max()),
        "max_abs_logit_diff": float((fast_scores.label_logits - plain_logits).abs().max()),
    }

    reply = time_reply(engine, reply_tokens)
    for _ in range(rounds - 1):
        again = time_reply(engine, reply_tokens)
        reply = ReplyTiming(
            reply.prompt_tokens,
            reply.new_tokens,
            min(reply.first_token_seconds, again.first_token_seconds),
            max(reply.decode_tokens_per_second, again.decode_tokens_per_second),
            max(reply.loop_tokens_per_second, again.loop_tokens_per_second),
        )
    # Again next to the decode it bounds, keeping the better one: a neighbour's job can only lower it.
    bandwidth = max(bandwidth, measure_bandwidth())
    weights = report.weights_bytes
    limit = bandwidth / weights
    tokens = [len(engine.message_ids(t)) for t in texts]
    naive_rate, single_rate, bulk_rate = n / naive_s, n / single_s, n / bulk_s
    return {
        "model": settings.model,
        "cpu_model": cpu_model(),
        "threads": report.threads,
        "dtype": report.dtype,
        "quantize": report.quantize,
        "messages": n,
        "rounds": rounds,
        "prefix_tokens": report.prefix_tokens,
        "mean_message_tokens": sum(tokens) / n,
        "sentiment_batch_size": settings.sentiment_batch_size,
        "naive_messages_per_second": naive_rate,
        "single_messages_per_second": single_rate,
        "bulk_messages_per_second": bulk_rate,
        "plain_messages_per_second": n / plain_s,
        "speedup_single_vs_naive": single_rate / naive_rate,
        "speedup_bulk_vs_naive": bulk_rate / naive_rate,
        "agreement": agreement,
        "reply_prompt_tokens": reply.prompt_tokens,
        "reply_new_tokens": reply.new_tokens,
        "reply_first_token_seconds": reply.first_token_seconds,
        "reply_tokens_per_second": reply.decode_tokens_per_second,
        "decode_loop_tokens_per_second": reply.loop_tokens_per_second,
        "memory_bandwidth_bytes_per_second": bandwidth,
        "bandwidth_limit_tokens_per_second": limit,
        "decode_fraction_of_limit": reply.decode_tokens_per_second / limit,
        "cold_load_seconds": cold_seconds,
        "warm_load_seconds": warm["load"]["seconds"],
        "warm_load_wall_seconds": warm["wall_seconds"],
        "peak_rss_bytes": warm["peak_rss_bytes"],
        "bench_peak_rss_bytes": peak_rss_bytes(),
        "weights_bytes": weights,
        "rss_over_weights": warm["peak_rss_bytes"] / weights,
    }


# ----------------------------------------------------------------------------------------------- output
def format_table(r: dict[str, Any]) -> str:
    mib = 2**20
    a = r["agreement"]
    cold = "-" if r["cold_load_seconds"] is None else f"{r['cold_load_seconds']:.1f} s"
    msgs = f"{r['messages']} (mean {r['mean_message_tokens']:.0f} tokens on a {r['prefix_tokens']}-token prefix)"
    single = f"{r['single_messages_per_second']:.2f} msg/s  ({r['speedup_single_vs_naive']:.1f}x naive)"
    bulk = f"{r['bulk_messages_per_second']:.2f} msg/s  ({r['speedup_bulk_vs_naive']:.1f}x naive)"
    diffs = f"max |dp| {a['max_abs_p_positive_diff']:.2g}, max |dlogit| {a['max_abs_logit_diff']:.2g}"
    limit = r["bandwidth_limit_tokens_per_second"]
    load = f"{cold} / {r['warm_load_seconds']:.1f} s ({r['warm_load_wall_seconds']:.1f} s from process start)"
    rss = f"{r['peak_rss_bytes'] / mib:.0f} MiB ({r['rss_over_weights']:.2f}x weights)"
    rows = [
        ("model", r["model"]),
        ("timed rounds (best kept)", str(r.get("rounds", 1))),
        ("cpu / threads", f"{r['cpu_model']} / {r['threads']}"),
        ("dtype / quantize", f"{r['dtype']} / {r['quantize']}"),
        ("messages", msgs),
        ("naive generate, one at a time", f"{r['naive_messages_per_second']:.2f} msg/s"),
        ("plain forward, one at a time", f"{r['plain_messages_per_second']:.2f} msg/s"),
        ("single (cached prefix)", single),
        (f"bulk (batches of {r['sentiment_batch_size']})", bulk),
        ("labels fast = plain", f"{a['labels_fast_vs_plain']:.1%} ({diffs})"),
        ("labels naive = fast", f"{a['labels_naive_vs_fast']:.1%} ({a['naive_unparsed']:.0%} of naive unparsed)"),
        ("reply first token", f"{r['reply_first_token_seconds']:.2f} s ({r['reply_prompt_tokens']}-token prompt)"),
        ("reply decode (generate)", f"{r['reply_tokens_per_second']:.1f} tok/s ({r['reply_new_tokens']} tokens)"),
        ("decode, bare forward loop", f"{r['decode_loop_tokens_per_second']:.1f} tok/s"),
        ("memory bandwidth", f"{r['memory_bandwidth_bytes_per_second'] / 1e9:.1f} GB/s"),
        ("bandwidth-limit decode", f"{limit:.1f} tok/s  (decode at {r['decode_fraction_of_limit']:.0%} of it)"),
        ("load cold / warm", load),
        ("weights", f"{r['weights_bytes'] / mib:.0f} MiB"),
        ("peak RSS, worker-like process", rss),
        ("peak RSS, this benchmark", f"{r['bench_peak_rss_bytes'] / mib:.0f} MiB (reference paths, bandwidth probe)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Model to measure (default: ALLINONE_MODEL).")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="Default: ALLINONE_DTYPE.")
    p.add_argument("--quantize", choices=["none", "int8"], help="Default: ALLINONE_QUANTIZE.")
    p.add_argument("--threads", type=int, help="Default: ALLINONE_THREADS.")
    p.add_argument("--batch-size", type=int, help="Bulk batch size (default: ALLINONE_SENTIMENT_BATCH_SIZE).")
    p.add_argument("--messages", type=Path, action="append", help="A JSON Lines file with a 'text' field; repeatable.")
    p.add_argument("--n", type=int, default=32, help="Messages measured on every path (default 32).")
    p.add_argument("--rounds", type=int, default=2, help="Timed rounds of every path; the best counts (default 2).")
    p.add_argument("--reply-tokens", type=int, default=64, help="Length of the timed reply (default 64).")
    p.add_argument("--cold", action="store_true", help="Also time a cold GGUF conversion (into a temporary cache).")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-work", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        _probe_main(args.probe, args.probe_work)
        return 0
    from worker.settings import Settings

    overrides = {
        "model": args.model,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "threads": args.threads,
        "sentiment_batch_size": args.batch_size,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    texts = load_messages(args.messages or list(DEFAULT_MESSAGE_FILES), args.n)
    if not texts:
        print("no messages to measure", file=sys.stderr)
        return 2
    result = run(settings, texts, cold=args.cold, reply_tokens=args.reply_tokens, rounds=max(1, args.rounds))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
