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
