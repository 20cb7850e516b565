"""What a run reports: its counts (:class:`Tally`, with label counts over time for the plot), the summary table
(rich, on standard error) and, with ``--plot``, the PNG (matplotlib). The one-line JSON on standard output is
``Tally.as_dict()``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any


class TimeBuckets:
    """Label counts per time bucket, for the plot. Starts at minutes; coarsens when buckets get many, so memory
    stays bounded however long the log spans."""

    def __init__(self, max_buckets: int = 20_000) -> None:
        self.width, self.max = 60.0, max_buckets
        self.counts: dict[float, Counter[str]] = {}

    def add(self, ts: float, label: str) -> None:
        b = ts - ts % self.width
        self.counts.setdefault(b, Counter())[label] += 1
        while len(self.counts) > self.max:
            self.width *= 60 if self.width < 3600 else 24
            merged: dict[float, Counter[str]] = {}
            for k, c in self.counts.items():
                merged.setdefault(k - k % self.width, Counter()).update(c)
            self.counts = merged


@dataclass
class Tally:
    """What the summary reports: updated by the enqueue side (rows, bad, enqueued, already done) and the collector
    (finished, written and their labels)."""

    rows: int = 0
    bad: int = 0
    enqueued: int = 0
    already_done: int = 0
    finished: int = 0
    written: int = 0
    pending: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    bad_timestamps: int = 0
    enqueue_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    buckets: TimeBuckets = field(default_factory=TimeBuckets)

    @property
    def good(self) -> int:
        return self.rows - self.bad

    def add_result(self, status: str, label: str | None, ts: float | None, unfinished: bool) -> None:
        """Count one written result (``unfinished``: written as it stood when ``--timeout`` passed)."""
        self.written += 1
        self.statuses[status] += 1
        self.pending += unfinished
        if label is not None:
            self.labels[label] += 1
            if ts is not None:
                self.buckets.add(ts, label)

    def as_dict(self) -> dict[str, Any]:
        elapsed = (self.finished_at or time.monotonic()) - self.started
        pos, neg = self.labels["positive"], self.labels["negative"]
        return {
            "rows": self.rows,
            "good": self.good,
            "bad": self.bad,
            "enqueued": self.enqueued,
            "already_done": self.already_done,
            "written": self.written,
            "done": self.statuses["done"],
            "failed": self.statuses["failed"] + self.statuses["missing"],
            "pending": self.pending,
            "positive": pos,
            "negative": neg,
            "positive_share": round(pos / (pos + neg), 4) if pos + neg else None,
            "enqueue_rate": round(self.good / self.enqueue_seconds, 1) if self.enqueue_seconds else None,
            # rows finished by the worker during this run (not those done by an earlier one), per second
            "throughput": round(max(0, self.finished - self.already_done) / elapsed, 2) if elapsed > 0 else None,
            "elapsed_seconds": round(elapsed, 2),
        }


def print_summary(tally: Tally, out: Path | None, errors: Path, console_file: IO[str] | None = None) -> None:
    """The end-of-run table (rich), to standard error."""
    from rich.console import Console
    from rich.table import Table

    d = tally.as_dict()
    console = Console(file=console_file or sys.stderr)
    t = Table(title="bulk job summary", show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_column("share", justify="right")
    labelled = d["positive"] + d["negative"]
    for name in ("positive", "negative"):
        share = f"{d[name] / labelled:.1%}" if labelled else "-"
        t.add_row(name, str(d[name]), share)
    t.add_section()
    t.add_row("rows read", str(d["rows"]), "")
    t.add_row("bad rows (errors file)", str(d["bad"]), f"{d['bad'] / d['rows']:.1%}" if d["rows"] else "-")
    t.add_row("done before this run", str(d["already_done"]), "")
    t.add_row("enqueued this run", str(d["enqueued"]), "")
    t.add_row("failed", str(d["failed"]), f"{d['failed'] / d['written']:.1%}" if d["written"] else "-")
    if d["pending"]:
        t.add_row("not finished (timeout)", str(d["pending"]), "")
    t.add_section()
    t.add_row("enqueue rate", f"{d['enqueue_rate'] or 0:,.0f} rows/s", "")
    t.add_row("throughput", f"{d['throughput'] or 0:,.2f} rows/s", "")
    t.add_row("elapsed", f"{d['elapsed_seconds']:,.1f} s", "")
    console.print(t)
    if out is not None:
        console.print(f"results: {out}")
    console.print(f"errors:  {errors}")


def plot_summary(tally: Tally, path: Path, title: str) -> None:
    """A PNG: sentiment share overall and, when rows had timestamps, the share over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    pos, neg = tally.labels["positive"], tally.labels["negative"]
    over_time = bool(tally.buckets.counts)
    fig, axes = plt.subplots(1, 2 if over_time else 1, figsize=(11 if over_time else 5, 3.8),
                             gridspec_kw={"width_ratios": [1, 3]} if over_time else None, squeeze=False)
    ax = axes[0][0]
    total = pos + neg
    shares = [pos / total, neg / total] if total else [0, 0]
    bars = ax.bar(["positive", "negative"], shares, color=["#3a923a", "#c03d3e"])
    for b, n, s in zip(bars, (pos, neg), shares, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, s + 0.01, f"{s:.0%}\n({n:,})", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("share of rows")
    ax.set_title(f"overall ({total:,} rows)")
    if over_time:
        ax2 = axes[0][1]
        keys = sorted(tally.buckets.counts)
        # Re-bucket to the smallest round width that gives at most ~60 bars, so a long log stays readable.
        span = keys[-1] - keys[0] + tally.buckets.width
        width = next((w for w in _NICE_WIDTHS if w >= tally.buckets.width and span / w <= 60), _NICE_WIDTHS[-1])
        width = max(width, tally.buckets.width)
        merged: dict[float, Counter[str]] = {}
        for k in keys:
            merged.setdefault(k - k % width, Counter()).update(tally.buckets.counts[k])
        xs = sorted(merged)
        when = [datetime.fromtimestamp(x, tz=timezone.utc) for x in xs]
        middle = [datetime.fromtimestamp(x + width / 2, tz=timezone.utc) for x in xs]
        p = [merged[x]["positive"] for x in xs]
        n = [merged[x]["negative"] for x in xs]
        share = [a / (a + b) if a + b else float("nan") for a, b in zip(p, n, strict=True)]
        rows = [a + b for a, b in zip(p, n, strict=True)]
        ax2.bar(when, rows, width=width / 86400 * 0.9, color="#cccccc", align="edge", label="rows")
        ax2.set_ylabel("rows per bucket")
        ax3 = ax2.twinx()
        ax3.plot(middle, share, "o-", color="#3a923a", label="positive share")
        ax3.set_ylim(0, 1)
        ax3.set_ylabel("positive share")
        ax2.xaxis.set_major_formatter(mdates.ConciseDateFormatter(mdates.AutoDateLocator()))
        ax2.set_title(f"over time (UTC, buckets of {_human(width)})")
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_NICE_WIDTHS = [60 * m for m in (1, 5, 15, 30)] + [3600 * h for h in (1, 2, 3, 6, 12)] + [
    86400 * d for d in (1, 2, 7, 14, 30, 91, 365)
]


def _human(seconds: float) -> str:
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= s:
            return f"{seconds / s:.3g} {unit}"
    return f"{seconds:g} s"
