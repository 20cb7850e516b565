"""Train a sentiment adapter: LoRA on the decoder layers, with the product's own sentiment prompt and label words.

    python -m worker.train_adapter --train sentiment-zh.train.jsonl --train sentiment-en.train.jsonl \
        --limit 1500 --epochs 2 --out adapters/qwen.safetensors

Then ``ALLINONE_SENTIMENT_ADAPTER=adapters/qwen.safetensors`` makes the worker score sentiment with it (method
"prompt+adapter"); replies run without it. The loss is the cross-entropy of the two label words' logits at the
answer position: exactly the two numbers the worker compares. An adapter belongs to one model and one sentiment
prompt (its metadata records both, as a head's does).

What keeps it cheap on a CPU: with ``--layers N`` only the top N decoder layers are adapted, so autograd records
nothing below them (no input of the lower layers needs a gradient) and the backward pass runs through those only;
messages are cut to ``--max-tokens``; batches hold messages of similar length. The cached prompt prefix is
recomputed with the current adapter every ``--prefix-every`` steps, and no gradient flows into it: the adapter
learns from the message and answer tokens (the worker computes the prefix with the finished adapter, exactly).
A dev check (accuracy, log-loss, positive share) runs ``--checks-per-epoch`` times an epoch; the adapter with
the lowest dev log-loss is kept, and training stops when ``--patience`` checks in a row did not improve it.
At the end the adapter's label offset is fitted on the best check's dev logits (one number added to the positive
label's logit, the log-loss's minimum; ``--no-calibrate`` leaves it at 0): it moves the decision threshold to where
the dev messages put it, which an adapter's training on the label words leaves off by a few points of positive share.
``--init ADAPTER`` goes on training a saved adapter (on new messages, at another step size): its first dev check is
that adapter's, so the result is never worse on dev than where it started; ``--init ADAPTER --epochs 0`` only checks
and calibrates it. ``--out`` is also written at every check that lowers the dev loss (renamed into place), so a run
stopped early leaves its best check behind.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from worker.engine.adapter import ATTENTION, MLP, SentimentAdapter, target_names
from worker.errors import AdapterError
from worker.prompts import LABELS, prompt_fingerprint
from worker.tools import datasets
from worker.tools.datasets import Example, balanced_subset, read_examples

PROJECTIONS = {"attn": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}


def batches(engine: Any, examples: list[Example], batch_size: int, max_tokens: int, rng: random.Random) -> list:
    """One epoch's batches: a seeded shuffle, then messages of similar length grouped (passes of even size)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    ids = {i: engine.sentiment.message_ids(examples[i].text, max_tokens) for i in order}
    out = []
    pool = batch_size * 16
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: len(ids[i]))
        for k in range(0, len(chunk), batch_size):
            rows = chunk[k:k + batch_size]
            out.append(engine.sentiment.batch([ids[i] for i in rows], rows))
    rng.shuffle(out)
    return out


def dev_logits(engine: Any, dev: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's current label logits [n, 2] on ``dev`` and the gold label indices [n]."""
    scores = engine.score([e.text for e in dev], layers=())
    return scores.label_logits.float(), torch.tensor([LABELS.index(e.label) for e in dev])


def dev_metrics(logits: torch.Tensor, y: torch.Tensor, offset: float = 0.0) -> dict[str, float]:
    """Accuracy, log-loss and predicted-positive share of label logits, ``offset`` added to the positive one's."""
    logits = logits + torch.tensor([offset, 0.0])
    pred = logits.argmax(1)
    return {"accuracy": (pred == y).float().mean().item(),
            "loss": torch.nn.functional.cross_entropy(logits, y).item(),
            "positive_share": (pred == 0).float().mean().item()}


def fit_label_offset(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The number added to the positive label's logit that minimises the log-loss on ``(logits, y)``: one
    parameter, so a few hundred dev messages pin it down (the log-loss is convex in it)."""
    offset = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([offset], max_iter=100, line_search_fn="strong_wolfe")
    zero = torch.zeros(1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits.float() + torch.cat([offset, zero]), y)
        loss.backward()
        return loss

    opt.step(closure)
    return round(float(offset.item()), 4)


def train_adapter(
    engine: Any, train: list[Example], dev: list[Example], *, epochs: int = 2, rank: int = 8, alpha: float = 16.0,
    layers: int | None = None, projections: str = "all", lr: float = 5e-4, batch_size: int = 8, max_tokens: int = 64,
    checks_per_epoch: int = 1, patience: int = 2, prefix_every: int = 4, seed: int = 0, progress: bool = True,
    init: SentimentAdapter | None = None, calibrate: bool = True,
    checkpoint: Callable[[SentimentAdapter], Any] | None = None,
) -> tuple[SentimentAdapter, dict[str, Any]]:
    """Train an adapter on the loaded engine (left with the best adapter in use); returns it and the history.

    ``init``: go on training a saved adapter (its rank, scale and layers; ``rank``, ``alpha``, ``layers`` and
    ``projections`` are then not used), on more messages or at another step size; with ``epochs=0`` it is only
    checked and calibrated. ``calibrate``: fit the adapter's label offset on the dev messages at the end (the best
    check's logits; :func:`fit_label_offset`).
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    n_layers = engine.num_layers
    top = tuple(range(max(0, n_layers - (layers or n_layers)), n_layers))
    meta = {"model": engine.identity.as_dict(), "prompt": prompt_fingerprint(engine.few_shot)}
    if init is None:
        adapter = SentimentAdapter.create(engine.model, top, PROJECTIONS[projections], rank=rank, alpha=alpha,
                                          seed=seed, meta=meta)
    else:
        init.check_model(identity=engine.identity, prompt=meta["prompt"])
        adapter = SentimentAdapter(
            a={n: torch.nn.Parameter(t.detach().float().clone()) for n, t in init.a.items()},
            b={n: torch.nn.Parameter(t.detach().float().clone()) for n, t in init.b.items()},
            rank=init.rank, alpha=init.alpha, label_offset=init.label_offset,
            meta={**meta, "init": {"fingerprint": init.fingerprint, "meta": init.meta}})
        top = tuple(range(min(adapter.layers), n_layers))
        projections = init.meta.get("projections", projections)
    # A gradient crosses a frozen projection only inside a LoRA wrapper unless it is a plain Linear (packed bf16
    # and quantised kernels have no backward): below the top adapted layer, every projection must be one of those.
    blind = [] if epochs == 0 else [
        n for n in target_names(engine.model, top, ATTENTION + MLP)
        if n not in adapter.a and type(engine.model.get_submodule(n)) is not torch.nn.Linear]
    if blind:
        raise AdapterError(f"{blind[0]} is not a plain Linear and would not pass gradients: train with "
                           "--projections all, or load the model with --dtype float32")
    engine.use_adapter(adapter)
    params = adapter.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps_per_epoch = -(-len(train) // batch_size)
    total = steps_per_epoch * epochs
    warmup = min(20, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / max(1, total)))
    check_at = {round(steps_per_epoch * (k + 1) / checks_per_epoch) for k in range(checks_per_epoch)}
    history: dict[str, Any] = {"train": [], "dev": [], "steps_per_epoch": steps_per_epoch}

    def check(step: int, epoch: float) -> dict[str, float]:
        engine.use_adapter(adapter)  # the prefix, recomputed with the adapter as it is now
        nonlocal last_logits
        with torch.no_grad():
            if dev:
                last_logits = dev_logits(engine, dev)
                d = dev_metrics(*last_logits)
            else:
                d = {"accuracy": float("nan"), "loss": float("nan"), "positive_share": float("nan")}
        d.update(step=step, epoch=round(epoch, 3), seconds=round(time.perf_counter() - t0, 1))
        history["dev"].append(d)
        return d

    t0 = time.perf_counter()
    last_logits: tuple[torch.Tensor, torch.Tensor] | None = None
    best = check(0, 0.0)
    best_logits = last_logits
    best_state = {k: t.detach().clone() for k, t in adapter.a.items()}, {k: t.detach().clone() for k, t in
                                                                          adapter.b.items()}
    since_best, step, stop = 0, 0, False
    train_seconds = 0.0
    for epoch in range(epochs):
        bar = tqdm(batches(engine, train, batch_size, max_tokens, rng), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not progress, unit="batch")
        running = None
        for k, batch in enumerate(bar, start=1):
            t1 = time.perf_counter()
            if (k - 1) % prefix_every == 0:
                prefix = engine.sentiment.compute_prefix(trainable=True)
            y = torch.tensor([LABELS.index(train[i].label) for i in batch.rows])
            loss = torch.nn.functional.cross_entropy(engine.sentiment.train_logits(batch, prefix), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            train_seconds += time.perf_counter() - t1
            step += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            history["train"].append({"step": step, "loss": round(loss.item(), 5), "items": len(batch.rows)})
            bar.set_postfix(loss=f"{running:.3f}", dev=f"{best['accuracy']:.3f}")
            if not dev or k not in check_at:
                continue
            d = check(step, epoch + k / steps_per_epoch)
            bar.write(f"step {step}: dev accuracy {d['accuracy']:.4f}, loss {d['loss']:.4f}, "
                      f"predicted positive {d['positive_share']:.3f}")
            if d["loss"] < best["loss"]:
                best, best_logits, since_best = d, last_logits, 0
                best_state = ({n: t.detach().clone() for n, t in adapter.a.items()},
                              {n: t.detach().clone() for n, t in adapter.b.items()})
                if checkpoint is not None:
                    checkpoint(SentimentAdapter(a=best_state[0], b=best_state[1], rank=adapter.rank,
                                                alpha=adapter.alpha, label_offset=adapter.label_offset,
                                                meta={**adapter.meta, "checkpoint": {"step": step, "best": d}}))
            else:
                since_best += 1
                if since_best >= patience:
                    stop = True
                    break
        bar.close()
        if stop:
            break
    if dev:  # keep the adapter of the best dev check
        with torch.no_grad():
            for n in adapter.names:
                adapter.a[n].copy_(best_state[0][n])
                adapter.b[n].copy_(best_state[1][n])
    else:
        best = check(step, epochs)
    items = sum(r["items"] for r in history["train"])
    if step == 0 and init is not None:  # only checked (and calibrated): it keeps the record of its training
        adapter.meta = {k: v for k, v in init.meta.items() if k not in ("label_offset", "calibrated")}
        adapter.meta["best"] = best
    else:
        adapter.meta.update(
            layers=list(top), projections=projections, lr=lr, batch_size=batch_size, max_tokens=max_tokens,
            prefix_every=prefix_every, seed=seed, train_n=len(train), items_seen=items, steps=step, best=best,
            seconds=round(time.perf_counter() - t0, 1),
            train_seconds_per_item=round(train_seconds / max(1, items), 4), stopped_early=stop,
        )
    if calibrate and best_logits is not None:  # the checks ran with the offset it started with (0, or init's)
        more = fit_label_offset(*best_logits)
        adapter.label_offset = round(adapter.label_offset + more, 4)
        adapter.meta.update(label_offset=adapter.label_offset, calibrated={
            "dev_n": len(dev), "quantize": engine.report.quantize,
            **dev_metrics(*best_logits, offset=more)})
    engine.use_adapter(adapter)
    return adapter, history


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m worker.train_adapter", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", action="append", default=[], type=Path,
                    help="labelled JSON Lines or CSV; repeatable (required unless --epochs 0)")
    ap.add_argument("--dev", action="append", type=Path,
                    help="labelled messages for the dev check; repeatable (default: the shipped zh and en dev sets)")
    ap.add_argument("--out", required=True, type=Path,
                    help="the adapter file to write (.safetensors); written at every dev check that lowers the dev "
                    "loss too, so a run stopped early keeps its best check (uncalibrated: calibrate it with "
                    "--init OUT --epochs 0)")
    ap.add_argument("--model", help="overrides ALLINONE_MODEL")
    ap.add_argument("--limit", type=int, help="a balanced, deterministic subset of this many messages per train file")
    ap.add_argument("--dev-limit", type=int, help="a balanced subset of this many messages per dev file")
    ap.add_argument("--init", type=Path, metavar="ADAPTER",
                    help="go on training this saved adapter (its rank, alpha and layers) instead of a fresh one")
    ap.add_argument("--epochs", type=int, default=2,
                    help="0 with --init: only check the saved adapter on dev and fit its label offset")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0, help="the low-rank term is scaled by alpha / rank")
    ap.add_argument("--layers", type=int, default=None,
                    help="adapt the top N decoder layers (default: all; on the stand-in, all 24 moved test accuracy "
                         "+4.0 / +3.5 points where the top 8 moved it +0.7 / +1.5, docs/evaluation.md)")
    ap.add_argument("--projections", choices=sorted(PROJECTIONS), default="all")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64, help="messages are cut to this many tokens for training")
    ap.add_argument("--checks-per-epoch", type=int, default=1)
    ap.add_argument("--patience", type=int, default=2, help="stop after this many dev checks without improvement")
    ap.add_argument("--prefix-every", type=int, default=4,
                    help="recompute the cached prompt prefix with the adapter every N steps")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="overrides ALLINONE_DTYPE")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="leave the label offset at 0 (default: fitted on the dev messages at the end)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--history", type=Path, help="write the loss and dev history here (JSON)")
    ap.add_argument("--plot", type=Path, help="write the training curve here (PNG)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.epochs < 0:
        ap.error("--epochs must be 0 or more")
    if a.epochs > 0 and not a.train:
        ap.error("--train is required to train (--epochs 0 with --init only checks and calibrates an adapter)")
    if a.epochs == 0 and not a.init:
        ap.error("--epochs 0 needs --init ADAPTER (the adapter to check and calibrate)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from worker.engine import Engine
    from worker.settings import Settings

    train: list[Example] = []
    for path in a.train:  # read before the model loads: a wrong path fails at once
        ex = read_examples(path)
        train += balanced_subset(ex, a.limit, seed=a.seed) if a.limit else ex
    dev: list[Example] = []
    for path in a.dev or [datasets.shipped(lang, "dev") for lang in datasets.LANGS]:
        ex = read_examples(path)
        dev += balanced_subset(ex, a.dev_limit, seed=a.seed) if a.dev_limit else ex
    overrides: dict[str, Any] = {"model": a.model} if a.model else {}
    if a.dtype:
        overrides["dtype"] = a.dtype
    # Trained on the unquantised weights (quantisation is a deployment choice; the identity is the same). Only
    # checked and calibrated (--epochs 0): on the weights as the worker loads them, whose label logits the offset
    # corrects (on the stand-in, int4 moved the fitted offset from +0.11 to -0.11).
    if a.epochs > 0:
        overrides["quantize"] = "none"
    settings = Settings(**overrides, sentiment_head=None, sentiment_adapter=None)
    init = SentimentAdapter.load(a.init) if a.init else None
    engine = Engine(settings)
    engine.load()
    adapter, history = train_adapter(
        engine, train, dev, epochs=a.epochs, rank=a.rank, alpha=a.alpha, layers=a.layers, projections=a.projections,
        lr=a.lr, batch_size=a.batch_size, max_tokens=a.max_tokens, checks_per_epoch=a.checks_per_epoch,
        patience=a.patience, prefix_every=a.prefix_every, seed=a.seed, progress=not a.no_progress, init=init,
        calibrate=not a.no_calibrate, checkpoint=lambda best: best.save(a.out))
    out = adapter.save(a.out)
    if a.history:
        a.history.parent.mkdir(parents=True, exist_ok=True)
        a.history.write_text(json.dumps({"meta": adapter.meta, **history}))
    if a.plot:
        from worker.tools.plots import plot_training

        plot_training(history, a.plot, title=f"sentiment adapter on {engine.identity.name}")
    print(json.dumps({"out": str(out), "bytes": out.stat().st_size, "fingerprint": adapter.fingerprint,
                      **adapter.meta}))
    return 0
