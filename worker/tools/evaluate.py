"""Measure sentiment against labelled messages: the worker's own code path, a trained baseline beside it.

    python -m worker.evaluate [--data FILE ...] [--split test|dev] [--limit 400] [--json] [--plot out.png]
        [--head HEAD] [--adapter ADAPTER [--adapter-head HEAD]] [--predictions out.jsonl]

Without ``--data`` it scores the sets shipped with the product (the zh and the en test set, or ``--split dev``), each
reported on its own. The model is loaded once, as the worker loads it (``Settings`` from the environment, overridden
by ``--model`` and ``--head``), and every message goes through ``Engine.score`` then ``Engine.sentiments``, which is
exactly what ``Engine.classify`` runs. When a train split is found (``xx.test.jsonl`` -> ``xx.train.jsonl`` beside
it or among the rebuilt sets, see ``worker.tools.datasets``) or given, the TF-IDF baseline is fitted on it and scored
on the same messages in the same run. With ``--adapter`` the messages are scored a second time with the sentiment
adapter on, so prompt, head, adapter and adapter + head are measured on the same run. ``--predictions`` writes every
message with its gold label and each method's label and P(positive), one JSON object a line, for reading the errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.schemas import Sentiment
from worker.tools import datasets
from worker.tools.baseline import baseline_predict
from worker.tools.datasets import Example, balanced_subset, find_train_split, read_examples
from worker.tools.metrics import NEG, POS, roc_auc, summarize

# The per-message results of a method inside its report (its label and P(positive) for each message, in order): for
# --predictions, never printed with the report.
ITEMS = "items"


def score(engine: Any, examples: Sequence[Example]) -> dict[str, Any]:
    """Every metric of the engine as it is set up (adapter, head) on ``examples``; with a head, also the prompt
    read from the same forward pass (``"prompt"``)."""
    texts = [e.text for e in examples]
    y_true = [e.label for e in examples]
    t0 = time.perf_counter()
    scores = engine.score(texts)
    sentiments = engine.sentiments(scores)
    seconds = time.perf_counter() - t0
    y_pred = [s.label for s in sentiments]
    report = summarize(y_true, y_pred, [s.confidence for s in sentiments])
    p_pos = [s.confidence if s.label == POS else 1 - s.confidence for s in sentiments]
    report["auc"] = roc_auc(p_pos, y_true)
    report[ITEMS] = [{"label": label, "p_positive": q} for label, q in zip(y_pred, p_pos, strict=True)]
    report["method"] = sentiments[0].method if sentiments else "prompt"
    report["messages_per_second"] = len(texts) / seconds if seconds > 0 else 0.0
    report["seconds"] = seconds
    if engine.head is not None:
        # The same forward pass read without the head: what the prompt alone gives.
        p = engine.prompt_p_positive(scores).tolist()
        prompt = [Sentiment.from_p_positive(q) for q in p]
        report["prompt"] = summarize(y_true, [x.label for x in prompt], [x.confidence for x in prompt])
        report["prompt"]["auc"] = roc_auc(p, y_true)
        report["prompt"][ITEMS] = [{"label": x.label, "p_positive": q} for x, q in zip(prompt, p, strict=True)]
    return report


def variants(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The methods one scoring pass measured, by name: its own, and the prompt alone under a head."""
    out = {report["method"]: {k: v for k, v in report.items() if k != "prompt"}}
    if "prompt" in report:
        name = report["method"].removesuffix("+head")
        out[name] = report["prompt"] | {"method": name,
                                        "messages_per_second": report["messages_per_second"]}  # the same pass
    return out


def run(engine: Any, examples: Sequence[Example], train: Sequence[Example] | None = None,
        adapter: str | Path | None = None, adapter_head: str | Path | None = None) -> dict[str, Any]:
    """Classify ``examples`` with the loaded engine (and the baseline when ``train`` is given); every metric.

    With ``adapter``, the same messages are scored again with the adapter on (and ``adapter_head``, a head trained
    on its states): ``"variants"`` then holds prompt, prompt+head, prompt+adapter and prompt+adapter+head, each
    with its own messages per second (the same messages, one after the other: their ratio is the adapter's cost)."""
    report = score(engine, examples)
    if adapter is not None:
        head = engine.head
        engine.use_adapter(adapter)
        engine.use_head(adapter_head)
        try:
            on = score(engine, examples)
        finally:
            engine.use_adapter(None)
            engine.head = head
        report["variants"] = {**variants(report), **variants(on)}
    if train is not None:
        t1 = time.perf_counter()
        base = baseline_predict(train, [e.text for e in examples])
        report["baseline"] = summarize([e.label for e in examples], base)
        report["baseline"][ITEMS] = [{"label": label} for label in base]  # a TF-IDF classifier's labels alone
        report["baseline"]["seconds"] = time.perf_counter() - t1
        report["baseline_accuracy"] = report["baseline"]["accuracy"]
        report["baseline_train_n"] = len(train)
    return report


def methods(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every method a report measured, by name: prompt, head, adapter, adapter + head, and the baseline."""
    out = dict(report["variants"]) if "variants" in report else variants(report)
    if "baseline" in report:
        out["baseline"] = report["baseline"]
    return out


def predictions(report: dict[str, Any], examples: Sequence[Example]) -> list[dict[str, Any]]:
    """One row per message, in the order scored: its text, its gold label, and each method's label (and
    P(positive), the baseline's aside), with whether it was right."""
    by_method = methods(report)
    rows = []
    for i, ex in enumerate(examples):
        row: dict[str, Any] = {"index": i, "text": ex.text, "label": ex.label}
        for name, m in by_method.items():
            item = m[ITEMS][i]
            row[name] = {**item, "correct": item["label"] == ex.label}
        rows.append(row)
    return rows


def without_items(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its per-message results, at any depth (what ``--json`` prints)."""
    return {k: without_items(v) if isinstance(v, dict) else v for k, v in report.items() if k != ITEMS}


def text_report(r: dict[str, Any], title: str) -> str:
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

    if "variants" in r:
        for name, m in r["variants"].items():
            block(name, m)
            if "messages_per_second" in m:
                lines.append(f"  {'':<10} {m['messages_per_second']:.2f} messages/s")
    else:
        block(r["method"], r)
        if "prompt" in r:
            block("prompt", r["prompt"])
    if "baseline" in r:
        block("baseline", r["baseline"])
    lines.append(f"  {r['n']} messages, {r['messages_per_second']:.2f} messages/s")
    return "\n".join(lines)


def set_path(given: str, data: Path, several: bool) -> Path:
    """An output file (``--plot``, ``--predictions``) as given for one data set; with several, each set's name goes
    before the suffix."""
    p = Path(given)
    return p.with_name(f"{p.stem}-{data.stem}{p.suffix}") if several else p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m worker.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", type=Path,
                    help="labelled messages, JSON Lines or CSV; repeatable (default: the shipped zh and en sets)")
    ap.add_argument("--split", choices=datasets.SHIPPED_SPLITS, default="test",
                    help="which shipped sets, without --data (default: test)")
    ap.add_argument("--model", help="overrides ALLINONE_MODEL (hub id, folder or .gguf)")
    ap.add_argument("--head", help="a sentiment head (python -m worker.train_head); overrides ALLINONE_SENTIMENT_HEAD")
    ap.add_argument("--adapter", help="a sentiment adapter (python -m worker.train_adapter): the messages are scored "
                    "without it, then with it, and prompt, head, adapter and adapter+head are reported side by side")
    ap.add_argument("--adapter-head", help="with --adapter: a head trained on the adapter's states "
                    "(python -m worker.train_head --adapter)")
    ap.add_argument("--no-head", action="store_true",
                    help="prompt scoring alone even if ALLINONE_SENTIMENT_HEAD is set")
    ap.add_argument("--limit", type=int, help="a balanced, deterministic subset of this many messages per set")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    ap.add_argument("--train", type=Path,
                    help="train split for the baseline, with one --data (default: the .train. file beside --data, "
                    "else in the rebuilt sets' folder)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline")
    ap.add_argument("--json", action="store_true", help="one JSON object per data set on stdout")
    ap.add_argument("--plot", help="write a PNG per data set: confusion matrix and reliability diagram")
    ap.add_argument("--predictions", help="write a JSON Lines file per data set: every message, its gold label and "
                    "each method's label and P(positive)")
    ap.add_argument("--format", choices=["jsonl", "csv"], help="input format (default: from the suffix)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--label-field", default="label")
    a = ap.parse_args(argv)
    if a.adapter_head and not a.adapter:
        ap.error("--adapter-head goes with --adapter")
    if a.train and a.data and len(a.data) > 1:
        ap.error("--train goes with one --data")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from worker.engine import Engine
    from worker.settings import Settings

    paths = a.data or [datasets.shipped(lang, a.split) for lang in datasets.LANGS]
    overrides: dict[str, Any] = {}
    if a.model:
        overrides["model"] = a.model
    if a.head:
        overrides["sentiment_head"] = Path(a.head)
    if a.no_head:
        overrides["sentiment_head"] = None
    if a.adapter:  # scored with and without it: the engine loads without one
        overrides["sentiment_adapter"] = None
    settings = Settings(**overrides)
    rebuilt = datasets.rebuilt_dir(settings.cache_dir)

    # Every file is read (and every train split found) before the model loads: a wrong path fails at once.
    sets = []
    for path in paths:
        examples = read_examples(path, a.format, a.text_field, a.label_field)
        if a.limit:
            examples = balanced_subset(examples, a.limit, seed=a.seed)
        train = None
        if not a.no_baseline:
            train_path = a.train or find_train_split(path, also_in=[rebuilt])
            if train_path is None:
                print(f"{path.name}: baseline skipped, no train split beside it or in {rebuilt} "
                      "(python -m worker.tools.datasets build writes it there; or --train FILE)", file=sys.stderr)
            else:
                train = read_examples(train_path, a.format if a.train else None, a.text_field, a.label_field)
        sets.append((path, examples, train))

    engine = Engine(settings)
    load = engine.load()
    for path, examples, train in sets:
        report = run(engine, examples, train, adapter=a.adapter, adapter_head=a.adapter_head)
        report.update(data=str(path), model=settings.model, model_identity=engine.identity.as_dict(),
                      dtype=load.dtype, head=str(settings.sentiment_head) if settings.sentiment_head else None)
        if a.plot:
            from worker.tools.plots import plot

            shown = report
            if "variants" in report:  # the adapter's figure: with its head when there is one
                v = report["variants"]
                shown = v.get("prompt+adapter+head") or v["prompt+adapter"]
            title = f"{path.name}: {shown['method']} on {engine.identity.name}"
            plot(shown, set_path(a.plot, path, len(sets) > 1), title=title)
        if a.predictions:
            out = set_path(a.predictions, path, len(sets) > 1)
            with out.open("w", encoding="utf-8") as f:
                for row in predictions(report, examples):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        report = without_items(report)
        if a.json:
            print(json.dumps(report), flush=True)
        else:
            print(text_report(report, f"{path} ({engine.identity}, {load.dtype})"), flush=True)
    return 0
