"""Measure sentiment against labelled messages: the worker's own code path, a trained baseline beside it.

    python -m worker.evaluate --data sentiment-zh.test.jsonl [--limit 400] [--json] [--plot out.png]

The model is loaded as the worker loads it (``Settings`` from the environment, overridden by ``--model`` and
``--head``) and every message goes through ``Engine.score`` then ``Engine.sentiments``, which is exactly what
``Engine.classify`` runs. When a train split is found (``xx.test.jsonl`` -> ``xx.train.jsonl``) or given, a TF-IDF
character 1-3-gram logistic regression is fitted on it and scored on the same messages in the same run.

The metrics are small pure functions over label lists, so they are unit tested on hand-computed cases.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.prompts import LABELS
from worker.schemas import Sentiment

POS, NEG = LABELS  # "positive", "negative": the order of every row and column below
_LABEL_ALIASES = {
    "positive": POS, "pos": POS, "1": POS, "true": POS,
    "negative": NEG, "neg": NEG, "0": NEG, "false": NEG,
}  # fmt: skip


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # "positive" | "negative"


# ------------------------------------------------------------------------------------------------ reading
def _label(value: Any, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _LABEL_ALIASES:
        raise ValueError(f"{where}: label {value!r} is neither positive nor negative")
    return _LABEL_ALIASES[key]


def read_examples(
    path: str | Path, fmt: str | None = None, text_field: str = "text", label_field: str = "label"
) -> list[Example]:
    """Labelled messages from JSON Lines or CSV (format from ``fmt``, else from the file suffix)."""
    path = Path(path)
    fmt = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
    rows: list[tuple[str, dict[str, Any]]] = []
    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "csv":
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            rows = [(f"{path}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f, delimiter=delimiter))]
        elif fmt == "jsonl":
            rows = [(f"{path}:{i + 1}", json.loads(line)) for i, line in enumerate(f) if line.strip()]
        else:
            raise ValueError(f"unknown format {fmt!r}: jsonl or csv")
    out = []
    for where, r in rows:
        if text_field not in r or label_field not in r:
            raise ValueError(f"{where}: needs the fields {text_field!r} and {label_field!r} (got {sorted(r)})")
        out.append(Example(text=str(r[text_field]), label=_label(r[label_field], where)))
    if not out:
        raise ValueError(f"{path}: no labelled messages")
    return out


def balanced_subset(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """``n`` examples, half of each label (as far as each has), chosen by a seeded shuffle, in file order."""
    by_label: dict[str, list[int]] = {POS: [], NEG: []}
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    rng = random.Random(seed)
    for idx in by_label.values():
        rng.shuffle(idx)
    want_pos = min(len(by_label[POS]), max(n - len(by_label[NEG]), (n + 1) // 2))
    chosen = by_label[POS][:want_pos] + by_label[NEG][: n - want_pos]
    return [examples[i] for i in sorted(chosen)]


def find_train_split(data: str | Path) -> Path | None:
    """``x.test.jsonl`` or ``x.dev.jsonl`` -> ``x.train.jsonl`` beside it, when it exists."""
    p = Path(data)
    for split in (".test.", ".dev."):
        if split in p.name:
            cand = p.with_name(p.name.replace(split, ".train."))
            return cand if cand.is_file() else None
    return None


# ------------------------------------------------------------------------------------------------ metrics
def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str]) -> list[list[int]]:
    """Rows: true label, columns: predicted label, both in the order (positive, negative)."""
    m = [[0, 0], [0, 0]]
    for t, p in zip(y_true, y_pred, strict=True):
        m[LABELS.index(t)][LABELS.index(p)] += 1
    return m


def accuracy(cm: list[list[int]]) -> float:
    n = sum(map(sum, cm))
    return (cm[0][0] + cm[1][1]) / n if n else 0.0


def per_class_recall(cm: list[list[int]]) -> dict[str, float]:
    return {lab: (cm[i][i] / sum(cm[i]) if sum(cm[i]) else 0.0) for i, lab in enumerate(LABELS)}


def per_class_f1(cm: list[list[int]]) -> dict[str, float]:
    out = {}
    for i, lab in enumerate(LABELS):
        tp, predicted, actual = cm[i][i], cm[0][i] + cm[1][i], sum(cm[i])
        out[lab] = 2 * tp / (predicted + actual) if predicted + actual else 0.0
    return out


def macro_f1(cm: list[list[int]]) -> float:
    return sum(per_class_f1(cm).values()) / 2


def positive_rate(cm: list[list[int]]) -> float:
    """Share of messages predicted positive."""
    n = sum(map(sum, cm))
    return (cm[0][0] + cm[1][0]) / n if n else 0.0


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict[str, float]]:
    """Equal-width confidence bins over [0, 1]: count, mean confidence and accuracy of each (empty bins kept)."""
    acc: list[list[float]] = [[0, 0.0, 0.0] for _ in range(bins)]
    for c, ok in zip(confidence, correct, strict=True):
        b = min(int(c * bins), bins - 1)
        acc[b][0] += 1
        acc[b][1] += c
        acc[b][2] += float(ok)
    return [
        {
            "lo": i / bins,
            "hi": (i + 1) / bins,
            "count": int(k),
            "confidence": s / k if k else 0.0,
            "accuracy": a / k if k else 0.0,
        }
        for i, (k, s, a) in enumerate(acc)
    ]


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over equal-width bins."""
    n = len(confidence)
    if not n:
        return 0.0
    bins_ = reliability_bins(confidence, correct, bins)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins_)


def roc_auc(p_positive: Sequence[float], y_true: Sequence[str]) -> float:
    """Area under the ROC curve of P(positive): the chance a random positive outranks a random negative (ties
    count half). Threshold-free, so it shows ranking skill even when every label comes out the same."""
    pos = [p for p, t in zip(p_positive, y_true, strict=True) if t == POS]
    neg = [p for p, t in zip(p_positive, y_true, strict=True) if t == NEG]
    if not pos or not neg:
        return float("nan")
    # rank-sum (Mann-Whitney U) with average ranks for ties
    order = sorted(range(len(pos) + len(neg)), key=lambda i: (pos + neg)[i])
    values = pos + neg
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    u = sum(ranks[: len(pos)]) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def summarize(
    y_true: Sequence[str], y_pred: Sequence[str], confidence: Sequence[float] | None = None
) -> dict[str, Any]:
    """Every metric of one set of predictions."""
    cm = confusion_matrix(y_true, y_pred)
    out: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": accuracy(cm),
        "macro_f1": macro_f1(cm),
        "recall": per_class_recall(cm),
        "positive_rate": positive_rate(cm),
        "confusion_matrix": cm,
    }
    if confidence is not None:
        correct = [t == p for t, p in zip(y_true, y_pred, strict=True)]
        out["ece"] = expected_calibration_error(confidence, correct)
        out["reliability"] = reliability_bins(confidence, correct)
    return out


# ------------------------------------------------------------------------------------------------ baseline
def baseline_predict(train: Sequence[Example], texts: Sequence[str]) -> list[str]:
    """TF-IDF character 1-3-grams + logistic regression, fitted on ``train``: the classifier to beat."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    clf = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2, max_features=300_000),
        LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced"),
    )
    clf.fit([e.text for e in train], [e.label for e in train])
    return [str(p) for p in clf.predict(list(texts))]


# ------------------------------------------------------------------------------------------------ the run
def run(
    engine: Any, examples: Sequence[Example], train: Sequence[Example] | None = None
) -> dict[str, Any]:
    """Classify ``examples`` with the loaded engine (and the baseline when ``train`` is given); every metric."""
    texts = [e.text for e in examples]
    y_true = [e.label for e in examples]
    t0 = time.perf_counter()
    scores = engine.score(texts)
    sentiments = engine.sentiments(scores)
    seconds = time.perf_counter() - t0
    y_pred = [s.label for s in sentiments]
    report = summarize(y_true, y_pred, [s.confidence for s in sentiments])
    report["auc"] = roc_auc([s.confidence if s.label == POS else 1 - s.confidence for s in sentiments], y_true)
    report["method"] = sentiments[0].method if sentiments else "prompt"
    report["messages_per_second"] = len(texts) / seconds if seconds > 0 else 0.0
    report["seconds"] = seconds
    if engine.head is not None:
        # The same forward pass read without the head: what the prompt alone gives.
        p = engine.prompt_p_positive(scores).tolist()
        prompt = [Sentiment.from_p_positive(q) for q in p]
        report["prompt"] = summarize(y_true, [x.label for x in prompt], [x.confidence for x in prompt])
        report["prompt"]["auc"] = roc_auc(p, y_true)
    if train is not None:
        t1 = time.perf_counter()
        base = baseline_predict(train, texts)
        report["baseline"] = summarize(y_true, base)
        report["baseline"]["seconds"] = time.perf_counter() - t1
        report["baseline_accuracy"] = report["baseline"]["accuracy"]
        report["baseline_train_n"] = len(train)
    return report


def plot(report: dict[str, Any], out: str | Path, title: str = "") -> None:
    """Confusion matrix and reliability diagram of one run, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
    cm = report["confusion_matrix"]
    ax1.imshow(cm, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax1.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=14,
                     color="white" if cm[i][j] > max(map(max, cm)) / 2 else "black")
    ax1.set_xticks([0, 1], LABELS)
    ax1.set_yticks([0, 1], LABELS)
    ax1.set_xlabel("predicted")
    ax1.set_ylabel("true")
    ax1.set_title(f"accuracy {report['accuracy']:.1%}, macro-F1 {report['macro_f1']:.3f}")
    bins = report["reliability"]
    width = bins[0]["hi"] - bins[0]["lo"]
    used = [b for b in bins if b["count"]]
    ax2.bar([b["lo"] for b in used], [b["accuracy"] for b in used], width=width, align="edge",
            edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax2.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax2.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o", color="C3",
             label="mean confidence")
    ax2.set_xlim(0, 1)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("accuracy")
    ax2.set_title(f"reliability: ECE {report['ece']:.3f}")
    ax2.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or f"{report['method']}, n={report['n']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _text_report(r: dict[str, Any], title: str) -> str:
    lines = [title]

    def block(name: str, m: dict[str, Any]) -> None:
        cm = m["confusion_matrix"]
        ece = f"  ECE {m['ece']:.3f}" if "ece" in m else ""
        ece += f"  AUC {m['auc']:.3f}" if "auc" in m else ""
        lines.append(
            f"  {name:<10} accuracy {m['accuracy']:.2%}  macro-F1 {m['macro_f1']:.4f}  "
            f"recall pos {m['recall'][POS]:.2%} neg {m['recall'][NEG]:.2%}  "
            f"predicted positive {m['positive_rate']:.1%}{ece}"
        )
        lines.append(f"  {'':<10} confusion (rows true pos/neg, cols predicted pos/neg): {cm[0]} {cm[1]}")

    block(r["method"], r)
    if "prompt" in r:
        block("prompt", r["prompt"])
    if "baseline" in r:
        block("baseline", r["baseline"])
    lines.append(f"  {r['n']} messages, {r['messages_per_second']:.2f} messages/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="labelled messages: JSON Lines or CSV")
    ap.add_argument("--model", help="overrides ALLINONE_MODEL (hub id, folder or .gguf)")
    ap.add_argument("--head", help="a sentiment head (python -m worker.calibrate); overrides ALLINONE_SENTIMENT_HEAD")
    ap.add_argument("--no-head", action="store_true",
                    help="prompt scoring alone even if ALLINONE_SENTIMENT_HEAD is set")
    ap.add_argument("--limit", type=int, help="a balanced, deterministic subset of this many messages")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    ap.add_argument("--train", help="train split for the baseline (default: the .train. file beside --data)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--plot", help="write a PNG: confusion matrix and reliability diagram")
    ap.add_argument("--format", choices=["jsonl", "csv"], help="input format (default: from the suffix)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--label-field", default="label")
    a = ap.parse_args(argv)

    from worker.engine import Engine
    from worker.settings import Settings

    examples = read_examples(a.data, a.format, a.text_field, a.label_field)
    if a.limit:
        examples = balanced_subset(examples, a.limit, seed=a.seed)
    train = None
    if not a.no_baseline:
        train_path = Path(a.train) if a.train else find_train_split(a.data)
        if train_path is not None:
            train = read_examples(train_path, a.format if a.train else None, a.text_field, a.label_field)

    overrides: dict[str, Any] = {}
    if a.model:
        overrides["model"] = a.model
    if a.head:
        overrides["sentiment_head"] = Path(a.head)
    if a.no_head:
        overrides["sentiment_head"] = None
    settings = Settings(**overrides)
    engine = Engine(settings)
    load = engine.load()
    report = run(engine, examples, train)
    report.update(data=str(a.data), model=settings.model, dtype=load.dtype,
                  head=str(settings.sentiment_head) if settings.sentiment_head else None)
    if a.plot:
        plot(report, a.plot, title=f"{Path(a.data).name}: {report['method']} on {Path(settings.model).name}")
    if a.json:
        print(json.dumps(report))
    else:
        print(_text_report(report, f"{a.data} ({settings.model}, {load.dtype})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
