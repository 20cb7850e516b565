"""``python -m worker.bench``: how fast the worker is on this machine, measured in one run on the same messages.

Every number of one report comes from one process on one machine, so only its ratios mean something: timings move
by tens of percent between runs on a shared machine. What it measures:

1. naive: the reference recipe — ``generate(max_new_tokens=10)`` over the whole sentiment prompt, then a substring
   search for a label word in the answer — one message at a time;
2. single: the product's sentiment path (cached prompt prefix, two LM-head rows), one message at a time;
3. bulk: the same path on all the messages at once, packed into passes (no padding);
4. reply: time to first token and greedy decode rate of a reply of ``--reply-tokens`` tokens; with
   ``llama-cpp-python`` installed, llama.cpp decodes the same prompt on the same GGUF between our rounds
   (``reply_vs_reference``: the median of the round-by-round ratios);
5. load: cold (GGUF conversion; only when no converted cache exists, or with ``--cold``) and warm (from the cache),
   each in a fresh subprocess, and the peak RSS of a worker-like process (load, a batch of sentiment, a reply);
6. memory bandwidth (a sum over a tensor far larger than the caches) and the decode rate it allows: decoding one
   token reads every weight once, so bandwidth / weights bytes is a ceiling no implementation beats.

It also checks that the speed costs no accuracy: the fast scores of every measured message against the plain,
uncached, unbatched forward pass (``Engine.score_plain``). Accuracy against labels is ``python -m worker.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from worker.tools import bench_reference, datasets
from worker.tools.bench_paths import (
    messages_with_replies,
    naive_label,
    time_batched_reply,
    time_conversation,
    time_reply,
)
from worker.tools.bench_probes import (
    FALLBACK_MESSAGES,
    REPLY_PROMPT,
    converted_cache_exists,
    cpu_model,
    measure_bandwidth,
    peak_rss_bytes,
    probe_main,
    run_probe,
)

# A conversation for the kept prompt cache: this many turns, each reply at most this many tokens.
CONVERSATION_TURNS = 8
CONVERSATION_REPLY_TOKENS = 32


# ----------------------------------------------------------------------------------------------- inputs
def default_message_files() -> list[Path]:
    """The zh and en dev sets shipped with the product (dev, not test: test is only for reporting accuracy)."""
    return [datasets.shipped(lang, "dev") for lang in datasets.LANGS]


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


# ----------------------------------------------------------------------------------------------- the run
def run(settings: Any, texts: list[str], cold: bool = False, reply_tokens: int = 64, rounds: int = 2) -> dict[str, Any]:
    import torch

    from worker.engine import Engine, cpu
    from worker.schemas import Sentiment

    cpu.huge_pages()  # before this process's first tensor, as in a worker (torch reads the setting once)
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
    load_only = run_probe(settings)
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

    # llama.cpp on the same GGUF, prompt (as text, special tokens kept) and threads, in its own process, its decode
    # rounds interleaved with ours: the ratio is the median of the pairs, each pair timed in the same minute.
    ids, _ = engine.reply_prompt_ids([], REPLY_PROMPT)
    ref = bench_reference.Reference(settings.model, engine.tokenizer.decode(ids[0]), report.threads, reply_tokens)
    reply, paired = None, []
    for _ in range(rounds):
        r = time_reply(engine, reply_tokens)
        reply = r if reply is None else reply.best(r)
        ref_rate = ref.round()
        if ref_rate:
            paired.append(r.decode_tokens_per_second / ref_rate)
    assert reply is not None
    reference = ref.finish()
    batch = settings.reply_batch_size
    batched_rate = max(time_batched_reply(engine, reply_tokens, batch) for _ in range(rounds))
    with_replies = max(messages_with_replies(engine, texts[:batch], reply_tokens) for _ in range(rounds))
    # A conversation's successive turns, each prompt holding the earlier ones: from scratch, then on the kept cache.
    turns = texts[:CONVERSATION_TURNS]
    fresh = time_conversation(engine, turns, CONVERSATION_REPLY_TOKENS, cache=False)
    kept = time_conversation(engine, turns, CONVERSATION_REPLY_TOKENS, cache=True)
    # Again next to the decode it bounds, keeping the better one: a neighbour's job can only lower it.
    bandwidth = max(bandwidth, measure_bandwidth())
    weights = report.weights_bytes
    limit = bandwidth / weights
    tokens = [len(engine.message_ids(t)) for t in texts]
    naive_rate, single_rate, bulk_rate = n / naive_s, n / single_s, n / bulk_s
    return {
        "model": settings.model,
        "model_identity": engine.identity.as_dict(),
        "cpu_model": cpu_model(),
        "threads": report.threads,
        "dtype": report.dtype,
        "quantize": report.quantize,
        "compiled_decode": report.compiled_decode,
        "dequant_rows": report.dequant_rows,
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
        "reply_batch_size": batch,
        "batched_reply_tokens_per_second": batched_rate,
        "messages_per_second_with_replies": with_replies,
        "conversation_turns": len(turns),
        "conversation_prompt_tokens": fresh.prompt_tokens,
        "conversation_first_token_seconds": kept.first_token_seconds,
        "conversation_first_token_seconds_uncached": fresh.first_token_seconds,
        "conversation_prompt_tokens_computed": kept.computed_per_reply,
        "conversation_prompt_tokens_computed_uncached": fresh.computed_per_reply,
        "conversation_replies_equal": sum(a == b for a, b in zip(kept.texts, fresh.texts, strict=True)) / len(turns),
        **reference,
        "reply_vs_reference": statistics.median(paired) if paired else None,
        "reply_vs_reference_rounds": paired,
        "memory_bandwidth_bytes_per_second": bandwidth,
        "bandwidth_limit_tokens_per_second": limit,
        "decode_fraction_of_limit": reply.decode_tokens_per_second / limit,
        "cold_load_seconds": cold_seconds,
        "warm_load_seconds": warm["load"]["seconds"],
        "warm_load_wall_seconds": warm["wall_seconds"],
        "load_peak_rss_bytes": load_only["peak_rss_bytes"],
        "load_rss_bytes": load_only["load"]["rss_bytes"],
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
    kept, fresh = r["conversation_first_token_seconds"], r["conversation_first_token_seconds_uncached"]
    convo_first = (f"{sum(kept) / len(kept):.2f} s kept cache, {sum(fresh) / len(fresh):.2f} s without "
                   f"(last turn {kept[-1]:.2f} / {fresh[-1]:.2f} s)")
    convo_tokens = (f"{r['conversation_prompt_tokens_computed']:.0f} kept cache, "
                    f"{r['conversation_prompt_tokens_computed_uncached']:.0f} without "
                    f"(replies equal {r['conversation_replies_equal']:.0%})")
    diffs = f"max |dp| {a['max_abs_p_positive_diff']:.2g}, max |dlogit| {a['max_abs_logit_diff']:.2g}"
    limit = r["bandwidth_limit_tokens_per_second"]
    load = f"{cold} / {r['warm_load_seconds']:.1f} s ({r['warm_load_wall_seconds']:.1f} s from process start)"
    rss = f"{r['peak_rss_bytes'] / mib:.0f} MiB ({r['rss_over_weights']:.2f}x weights)"
    ref = refmem = "- (llama-cpp-python not installed, or not a GGUF)"
    if r.get("reference_tokens_per_second"):
        ref = (f"{r['reference_tokens_per_second']:.1f} tok/s / {r['reference_first_token_seconds']:.2f} s "
               f"(worker decode {r['reply_vs_reference']:.2f}x)")
        refmem = f"{r['reference_peak_rss_bytes'] / mib:.0f} MiB"
    rows = [
        ("model", r["model"]),
        ("model identity", "{name} [{fingerprint}]".format(**r["model_identity"]) if "model_identity" in r else "-"),
        ("timed rounds (best kept)", str(r.get("rounds", 1))),
        ("cpu / threads", f"{r['cpu_model']} / {r['threads']}"),
        ("dtype / quantize / decode", f"{r['dtype']} / {r['quantize']} / "
                                      f"{'compiled' if r.get('compiled_decode') else 'eager'}"),
        ("messages", msgs),
        ("naive generate, one at a time", f"{r['naive_messages_per_second']:.2f} msg/s"),
        ("plain forward, one at a time", f"{r['plain_messages_per_second']:.2f} msg/s"),
        ("single (cached prefix)", single),
        (f"bulk (passes of up to {r['sentiment_batch_size']} messages)", bulk),
        ("labels fast = plain", f"{a['labels_fast_vs_plain']:.1%} ({diffs})"),
        ("labels naive = fast", f"{a['labels_naive_vs_fast']:.1%} ({a['naive_unparsed']:.0%} of naive unparsed)"),
        ("reply first token", f"{r['reply_first_token_seconds']:.2f} s ({r['reply_prompt_tokens']}-token prompt)"),
        ("reply decode (generate)", f"{r['reply_tokens_per_second']:.1f} tok/s ({r['reply_new_tokens']} tokens)"),
        ("decode, bare forward loop", f"{r['decode_loop_tokens_per_second']:.1f} tok/s"),
        (f"batched decode ({r['reply_batch_size']} rows)", f"{r['batched_reply_tokens_per_second']:.1f} tok/s"),
        ("bulk with replies", f"{r['messages_per_second_with_replies']:.2f} msg/s"),
        (f"conversation, {r['conversation_turns']} turns: first token", convo_first),
        ("  prompt tokens computed a reply", convo_tokens),
        ("llama.cpp decode / first token", ref),
        ("llama.cpp peak RSS", refmem),
        ("memory bandwidth", f"{r['memory_bandwidth_bytes_per_second'] / 1e9:.1f} GB/s"),
        ("bandwidth-limit decode", f"{limit:.1f} tok/s  (decode at {r['decode_fraction_of_limit']:.0%} of it)"),
        ("load cold / warm", load),
        ("weights", f"{r['weights_bytes'] / mib:.0f} MiB"),
        ("peak RSS while loading", f"{r['load_peak_rss_bytes'] / mib:.0f} MiB"),
        ("peak RSS, worker-like process", rss),
        ("peak RSS, this benchmark", f"{r['bench_peak_rss_bytes'] / mib:.0f} MiB (reference paths, bandwidth probe)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Model to measure (default: ALLINONE_MODEL).")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="Default: ALLINONE_DTYPE.")
    p.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], help="Default: ALLINONE_QUANTIZE.")
    p.add_argument("--reply-batch-size", type=int, help="Rows of a reply batch (default: ALLINONE_REPLY_BATCH_SIZE).")
    p.add_argument("--threads", type=int, help="Default: ALLINONE_THREADS.")
    p.add_argument("--compile-decode", action="store_true", default=None,
                   help="Compile the decode step (default: ALLINONE_COMPILE_DECODE).")
    p.add_argument("--batch-size", type=int, help="Bulk batch size (default: ALLINONE_SENTIMENT_BATCH_SIZE).")
    p.add_argument("--messages", type=Path, action="append",
                   help="A JSON Lines file with a 'text' field; repeatable (default: the shipped zh and en dev sets).")
    p.add_argument("--n", type=int, default=32, help="Messages measured on every path (default 32).")
    p.add_argument("--rounds", type=int, default=2, help="Timed rounds of every path; the best counts (default 2).")
    p.add_argument("--reply-tokens", type=int, default=64, help="Length of the timed reply (default 64).")
    p.add_argument("--cold", action="store_true", help="Also time a cold GGUF conversion (into a temporary cache).")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--probe-work", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        probe_main(args.probe, args.probe_work)
        return 0
    if args.reference:
        bench_reference.reference_main(args.reference)
        return 0
    from worker.settings import Settings

    overrides = {
        "model": args.model,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "threads": args.threads,
        "compile_decode": args.compile_decode,
        "sentiment_batch_size": args.batch_size,
        "reply_batch_size": args.reply_batch_size,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    texts = load_messages(args.messages or default_message_files(), args.n)
    if not texts:
        print("no messages to measure", file=sys.stderr)
        return 2
    result = run(settings, texts, cold=args.cold, reply_tokens=args.reply_tokens, rounds=max(1, args.rounds))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0

