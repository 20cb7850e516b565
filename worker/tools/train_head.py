"""Train a sentiment head on labelled messages, from the engine's own forward pass (one model in memory).

    python -m worker.train_head --train sentiment-zh.train.jsonl --train sentiment-en.train.jsonl \
        --limit 2000 --out heads/qwen.safetensors

Then ``ALLINONE_SENTIMENT_HEAD=heads/qwen.safetensors`` makes the worker classify with it ("prompt+head"). A head
belongs to one model and one sentiment prompt: its metadata records the model's identity and the prompt's
fingerprint, and the engine refuses it for any other. The train splits come from
``python -m worker.tools.datasets build``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from worker.engine.head import SentimentHead, check_features, feature_layers, feature_matrix
from worker.prompts import prompt_fingerprint
from worker.tools.datasets import POS, Example, balanced_subset, read_examples


def train_head(
    engine: Any, examples: list[Example], features: tuple[str, ...] = ("hidden", "logits"), c: float | None = None
) -> SentimentHead:
    """Score ``examples`` on the loaded engine and fit a head on the features."""
    check_features(features)
    scores = engine.score([e.text for e in examples], layers=feature_layers(features))
    y = torch.tensor([1 if e.label == POS else 0 for e in examples])
    meta = {"model": engine.identity.as_dict(), "prompt": prompt_fingerprint(engine.few_shot),
            # the states of the adapter in use, if any: the engine pairs this head with that adapter only
            "adapter": engine.adapter.fingerprint if engine.adapter is not None else None}
    return SentimentHead.fit(feature_matrix(scores, features), y, engine.hidden_size, features, c=c, meta=meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.train_head", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="append", required=True, help="labelled JSON Lines or CSV; repeatable")
    ap.add_argument("--out", required=True, help="the head file to write (.safetensors)")
    ap.add_argument("--model", help="overrides ALLINONE_MODEL")
    ap.add_argument("--limit", type=int, help="a balanced, deterministic subset of this many messages per file")
    ap.add_argument("--adapter", help="train on the states of this sentiment adapter (python -m worker.train_adapter; "
                    "overrides ALLINONE_SENTIMENT_ADAPTER); the head is then used with that adapter only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", default="hidden,logits",
                    help="comma-separated, of: hidden (final state), logits (the two label logits), layerN (the state "
                    "after decoder layer N, e.g. layer16)")
    ap.add_argument("--c", type=float, help="inverse regularisation strength (default: cross-validated)")
    a = ap.parse_args(argv)

    from worker.engine import Engine
    from worker.settings import Settings

    examples: list[Example] = []
    for path in a.train:
        ex = read_examples(path)
        examples += balanced_subset(ex, a.limit, seed=a.seed) if a.limit else ex
    features = check_features(tuple(f.strip() for f in a.features.split(",") if f.strip()))  # before the model loads
    overrides: dict[str, Any] = {"model": a.model} if a.model else {}
    if a.adapter:
        overrides["sentiment_adapter"] = a.adapter
    settings = Settings(**overrides, sentiment_head=None)
    engine = Engine(settings)
    engine.load()
    t0 = time.perf_counter()
    head = train_head(engine, examples, features, c=a.c)
    head.meta["seconds"] = round(time.perf_counter() - t0, 1)
    out = head.save(a.out)
    print(json.dumps({"out": str(out), "bytes": out.stat().st_size, "features": list(features), **head.meta}))
    return 0
