"""Cache the engine's sentiment features of labelled messages to disk, so heads and calibrations are compared
offline without running the model again.

    flock /tmp/allinone-cpu.lock python scripts/dump_features.py --data DEV.jsonl --out feats.npz \
        [--limit N] [--few-shot shots.json]

Saves label_logits [N,2], hidden [N,H] (final layer, last token, as the engine returns it), mean [N,H]
(final layer averaged over the message's own tokens), mid [N,L,H] (last token at a few middle layers) and labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine import Engine  # noqa: E402
from worker.evaluate import balanced_subset, read_examples  # noqa: E402
from worker.settings import Settings  # noqa: E402


def features(engine: Engine, texts: list[str], layers: list[int], bs: int = 16) -> dict[str, np.ndarray]:
    enc = [engine.message_ids(t) for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    n, h = len(texts), engine.hidden_size
    out = {
        "label_logits": np.zeros((n, 2), np.float32),
        "hidden": np.zeros((n, h), np.float32),
        "mean": np.zeros((n, h), np.float32),
        "mid": np.zeros((n, len(layers), h), np.float32),
        "midmean": np.zeros((n, len(layers), h), np.float32),
    }
    pipe = engine.sentiment
    plen = len(pipe.prefix_ids)
    for start in range(0, n, bs):
        idx = order[start : start + bs]
        batch = pipe.batch([enc[i] for i in idx], idx)
        o = pipe.run_on_prefix(batch, output_hidden_states=True)
        last, mask = batch.last, batch.attention_mask
        ar = torch.arange(len(idx))
        hid = o.last_hidden_state[ar, last].float()
        own = mask[:, plen:].unsqueeze(-1).float()
        mean = (o.last_hidden_state.float() * own).sum(1) / own.sum(1)
        mid = torch.stack([o.hidden_states[L][ar, last].float() for L in layers], 1)
        midmean = torch.stack([(o.hidden_states[L].float() * own).sum(1) / own.sum(1) for L in layers], 1)
        out["label_logits"][idx] = pipe.postprocess(hid).numpy()
        out["hidden"][idx] = hid.numpy()
        out["mean"][idx] = mean.numpy()
        out["mid"][idx] = mid.numpy()
        out["midmean"][idx] = midmean.numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--few-shot", help="JSON list of [text, label] pairs replacing prompts.FEW_SHOT")
    ap.add_argument("--model")
    ap.add_argument("--dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-layers", action="store_true", help="mid holds every layer's last-token state (float16)")
    a = ap.parse_args()
    kw = {k: v for k, v in (("model", a.model), ("dtype", a.dtype)) if v}
    settings = Settings(**kw)
    shots = tuple(tuple(x) for x in json.loads(Path(a.few_shot).read_text())) if a.few_shot else None
    engine = Engine(settings, few_shot=shots)
    engine.load()
    ex = read_examples(a.data)
    if a.limit:
        ex = balanced_subset(ex, a.limit, seed=a.seed)
    texts = [e.text for e in ex]
    n_layers = engine.model.config.num_hidden_layers
    layers = sorted({n_layers // 2, (3 * n_layers) // 4, n_layers - 4, n_layers - 2})
    if a.all_layers:
        layers = list(range(1, n_layers + 1))
    t0 = time.perf_counter()
    f = features(engine, texts, layers)
    dt = time.perf_counter() - t0
    y = np.array([1 if e.label == "positive" else 0 for e in ex], np.int8)
    if a.all_layers:
        f["mid"] = f["mid"].astype(np.float16)
        f["midmean"] = f["midmean"].astype(np.float16)
    np.savez(a.out, labels=y, layers=np.array(layers), texts=np.array(texts), **f)
    acc = float(((f["label_logits"][:, 0] > f["label_logits"][:, 1]) == y).mean())
    print(json.dumps({"out": a.out, "n": len(y), "seconds": round(dt, 1), "prompt_accuracy": round(acc, 4),
                      "prefix_tokens": engine.report.prefix_tokens, "dtype": engine.report.dtype}))


if __name__ == "__main__":
    main()
