"""The evaluation figure: confusion matrix and reliability diagram of one run, side by side (matplotlib, from the
``eval`` extra). ``docs/evaluation-{zh,en}-test.png`` are this figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.prompts import LABELS


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


def plot_training(history: dict[str, Any], out: str | Path, title: str = "") -> None:
    """The training curve of an adapter: train loss per step (smoothed) and the dev checks (loss, accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    train = history["train"]
    if train:
        steps = [r["step"] for r in train]
        smooth, run = [], None
        for r in train:
            run = r["loss"] if run is None else 0.9 * run + 0.1 * r["loss"]
            smooth.append(run)
        ax1.plot(steps, [r["loss"] for r in train], color="C0", alpha=0.25, lw=0.8, label="train loss (batch)")
        ax1.plot(steps, smooth, color="C0", label="train loss (smoothed)")
    dev = history["dev"]
    ax1.plot([d["step"] for d in dev], [d["loss"] for d in dev], "o-", color="C3", label="dev loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy of the two label logits")
    ax1.legend(fontsize=8)
    ax2.plot([d["step"] for d in dev], [d["accuracy"] for d in dev], "o-", color="C2", label="dev accuracy")
    ax2.plot([d["step"] for d in dev], [d["positive_share"] for d in dev], "s--", color="C7",
             label="dev predicted positive")
    ax2.set_xlabel("step")
    ax2.set_ylim(0.3, 1.0)
    ax2.legend(fontsize=8)
    fig.suptitle(title or "sentiment adapter training")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
