"""Markdown table of several ``python -m worker.bench --json`` results side by side (one column per file).

python scripts/bench_compare.py bf16.json fp32.json int8.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROWS: list[tuple[str, Any]] = [
    ("dtype / quantize", lambda r: f"{r['dtype']} / {r['quantize']}"),
    ("naive generate, msg/s", lambda r: f"{r['naive_messages_per_second']:.2f}"),
    ("single (cached prefix), msg/s", lambda r: f"{r['single_messages_per_second']:.2f}"),
    ("bulk, msg/s", lambda r: f"{r['bulk_messages_per_second']:.2f}"),
    ("single / naive", lambda r: f"{r['speedup_single_vs_naive']:.1f}x"),
    ("bulk / naive", lambda r: f"{r['speedup_bulk_vs_naive']:.1f}x"),
    ("labels fast = plain", lambda r: f"{r['agreement']['labels_fast_vs_plain']:.1%}"),
    ("max abs P(positive) fast - plain", lambda r: f"{r['agreement']['max_abs_p_positive_diff']:.3g}"),
    ("reply first token, s", lambda r: f"{r['reply_first_token_seconds']:.2f}"),
    ("reply decode, tok/s", lambda r: f"{r['reply_tokens_per_second']:.1f}"),
    ("bare forward loop, tok/s", lambda r: f"{r['decode_loop_tokens_per_second']:.1f}"),
    ("bandwidth limit, tok/s", lambda r: f"{r['bandwidth_limit_tokens_per_second']:.1f}"),
    ("warm load, s", lambda r: f"{r['warm_load_seconds']:.1f}"),
    ("weights, MiB", lambda r: f"{r['weights_bytes'] / 2**20:.0f}"),
    ("peak RSS (worker-like), MiB", lambda r: f"{r['peak_rss_bytes'] / 2**20:.0f}"),
    ("peak RSS / weights", lambda r: f"{r['rss_over_weights']:.2f}"),
]


def main(paths: list[str]) -> None:
    results = [json.loads(Path(p).read_text()) for p in paths]
    print("| | " + " | ".join(Path(p).stem for p in paths) + " |")
    print("|---|" + "---|" * len(paths))
    for name, cell in ROWS:
        print(f"| {name} | " + " | ".join(cell(r) for r in results) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
