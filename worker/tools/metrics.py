"""The metrics of one set of predictions: small pure functions over label lists, unit tested on hand-computed
cases. Labels are ``"positive"``/``"negative"``; every matrix row and column is in the order of ``LABELS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.prompts import LABELS

POS, NEG = LABELS  # "positive", "negative": the order of every row and column below


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
