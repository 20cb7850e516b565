"""What a sentiment adapter costs the worker: messages/s with and without it (single and bulk) and memory growth.

    python scripts/adapter_cost.py --model MODEL --adapter ADAPTER [--single 48] [--bulk 192] [--rounds 3]

One process, the same messages (the shipped dev sets, both languages), the two configurations interleaved round
by round, so a machine shared with other jobs slows both alike: read the ratios. Memory: the resident set after
scoring without the adapter, then after loading it and scoring with it (the growth is what the adapter costs).
"""

from __future__ import annotations

import argparse
import json
import time

from worker.engine import Engine
from worker.engine.loading import rss_bytes
from worker.settings import Settings
from worker.tools import datasets


def rate(engine: Engine, texts: list[str], batch_size: int) -> float:
    t0 = time.perf_counter()
    engine.score(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--single", type=int, default=48, help="messages scored one at a time, per round")
    ap.add_argument("--bulk", type=int, default=192, help="messages scored in batches, per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    texts = []
    for lang in datasets.LANGS:
        texts += [e.text for e in datasets.read_examples(datasets.shipped(lang, "dev"))]
    texts = texts[::2][: max(a.single, a.bulk)]
    engine = Engine(Settings(model=a.model, sentiment_head=None, sentiment_adapter=None))
    engine.load()
    engine.score(texts[:32])  # warm
    rss_off = rss_bytes()
    engine.use_adapter(a.adapter)
    engine.score(texts[:32])
    rss_on = rss_bytes()
    adapter_bytes = engine.adapter.nbytes if engine.adapter is not None else 0
    runs: dict[str, list[float]] = {"single_off": [], "single_on": [], "bulk_off": [], "bulk_on": []}
    for _ in range(a.rounds):
        for name, adapter in (("off", None), ("on", a.adapter)):
            engine.use_adapter(adapter)
            runs[f"single_{name}"].append(rate(engine, texts[: a.single], 1))
            runs[f"bulk_{name}"].append(rate(engine, texts[: a.bulk], engine.settings.sentiment_batch_size))
    best = {k: max(v) for k, v in runs.items()}
    print(json.dumps({
        "messages_per_second": best, "rounds": runs,
        "single_ratio": best["single_on"] / best["single_off"], "bulk_ratio": best["bulk_on"] / best["bulk_off"],
        "rss_off_mib": rss_off / 2**20, "rss_on_mib": rss_on / 2**20, "rss_growth_mib": (rss_on - rss_off) / 2**20,
        "adapter_mib": adapter_bytes / 2**20, "dtype": engine.report.dtype if engine.report else None,
        "threads": engine.settings.threads,
    }, indent=1))


if __name__ == "__main__":
    main()
