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

from worker.evaluate import expected_calibration_error  # noqa: E402
from worker.head import SentimentHead  # noqa: E402


def variants(d: np.lib.npyio.NpzFile) -> dict[str, np.ndarray]:
    lg = d["label_logits"]
    out = {
        "logits (Platt)": lg,
        "hidden": d["hidden"],
        "hidden+logits": np.c_[d["hidden"], lg],
        "hidden+mean": np.c_[d["hidden"], d["mean"]],
    }
    for i, layer in enumerate(d["layers"]):
        out[f"layer {layer}"] = d["mid"][:, i]
        out[f"layer {layer}+hidden+logits"] = np.c_[d["mid"][:, i], d["hidden"], lg]
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
    for name in names:
        xtr = np.concatenate([variants(t)[name] for t in trains])
        head = SentimentHead.fit(torch.tensor(xtr), torch.tensor(ytr), hidden_size=0, features=())
        row = {"variant": name, "c": head.meta["c"]}
        for k, d in evals.items():
            p = torch.sigmoid(head.logit(torch.tensor(variants(d)[name]))).numpy()
            row[k] = metrics(p, d["labels"].astype(int))
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
