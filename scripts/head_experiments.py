"""Compare sentiment-head variants offline, on features cached by scripts/dump_features.py.

    python scripts/head_experiments.py --train /tmp/aio/base-zh-train.npz --train /tmp/aio/base-en-train.npz \
        --eval zh=/tmp/aio/base-zh-dev.npz --eval en=/tmp/aio/base-en-dev.npz

Each variant is fitted on the train features of all languages together (one head serves every message) and scored
on each eval set: accuracy, share predicted positive, ECE. "prompt" is the two label logits alone; "prompt, centred"
shifts their difference so that half the train messages are positive (calibration without a head).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.head import SentimentHead, layer_of  # noqa: E402
from worker.evaluate import expected_calibration_error  # noqa: E402


def matrix(d: np.lib.npyio.NpzFile, features: tuple[str, ...]) -> np.ndarray:
    """The head's input for ``features`` (worker.engine.head names) from a features file."""
    cols = []
    layers = [int(x) for x in d["layers"]]
    for f in features:
        if f == "hidden":
            cols.append(d["hidden"])
        elif f == "logits":
            cols.append(d["label_logits"])
        elif f.startswith("mean"):  # experiments only: layer N averaged over the message's tokens
            cols.append(d["midmean"][:, layers.index(int(f[4:]))].astype(np.float32))
        else:
            cols.append(d["mid"][:, layers.index(layer_of(f))].astype(np.float32))
    return np.concatenate(cols, axis=1)


def variants(d: np.lib.npyio.NpzFile) -> dict[str, tuple[str, ...]]:
    layers = [int(x) for x in d["layers"]][:-1]  # the last is the final state, "hidden"
    out: dict[str, tuple[str, ...]] = {"logits (Platt)": ("logits",), "hidden+logits": ("hidden", "logits")}
    for n in layers:
        out[f"layer{n}"] = (f"layer{n}",)
        out[f"layer{n}+hidden+logits"] = (f"layer{n}", "hidden", "logits")
    if "midmean" in d.files:
        for n in layers:
            out[f"mean{n}"] = (f"mean{n}",)
            out[f"mean{n}+hidden+logits"] = (f"mean{n}", "hidden", "logits")
    if len(layers) > 8:  # a features file with every layer: try sets of middle and upper layers together
        top = len(layers) + 1
        for picks in ((top // 2, 2 * top // 3, 5 * top // 6), (top // 3, top // 2, 2 * top // 3, 5 * top // 6)):
            out["+".join(f"layer{n}" for n in picks) + "+hidden+logits"] = (
                *(f"layer{n}" for n in picks), "hidden", "logits")
    return out


def metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pred = (p >= 0.5).astype(int)
    conf = np.maximum(p, 1 - p)
    return {
        "accuracy": float((pred == y).mean()),
        "positive_rate": float(pred.mean()),
        "ece": expected_calibration_error(conf.tolist(), (pred == y).tolist()),
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", action="append", required=True)
    ap.add_argument("--eval", action="append", required=True, help="name=features.npz")
    ap.add_argument("--only", help="comma-separated variant names")
    ap.add_argument("--c", type=float, help="a fixed C for every variant (fast); default: cross-validated")
    a = ap.parse_args()
    trains = [np.load(p) for p in a.train]
    evals = {k: np.load(v) for k, v in (e.split("=", 1) for e in a.eval)}
    ytr = np.concatenate([t["labels"] for t in trains]).astype(int)
    rows = []
    # the prompt alone, and centred on the train median of its logit difference
    dtr = np.concatenate([t["label_logits"][:, 0] - t["label_logits"][:, 1] for t in trains])
    shift = -float(np.median(dtr))
    for name, b in (("prompt", 0.0), ("prompt, centred", shift)):
        row = {"variant": name, "c": None}
        for k, d in evals.items():
            diff = d["label_logits"][:, 0] - d["label_logits"][:, 1] + b
            row[k] = metrics(1 / (1 + np.exp(-diff)), d["labels"].astype(int))
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = list(variants(trains[0]))
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    hidden_size = int(trains[0]["hidden"].shape[1])
    for name in names:
        features = variants(trains[0])[name]
        xtr = np.concatenate([matrix(t, features) for t in trains])
        # (a mean-pooled layer has a layer's width: named as that layer for the head's shape checks)
        shape = tuple("layer" + f[4:] if f.startswith("mean") else f for f in features)
        head = SentimentHead.fit(torch.tensor(xtr), torch.tensor(ytr), hidden_size, shape, c=a.c)
        row = {"variant": name, "c": head.meta["c"]}
        for k, d in evals.items():
            p = torch.sigmoid(head.logit(torch.tensor(matrix(d, features)))).numpy()
            row[k] = metrics(p, d["labels"].astype(int))
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
