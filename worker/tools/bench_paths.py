"""The timed paths the benchmark sets beside the product's: the reference recipe for sentiment (generate a few
tokens, look for a label word) and a reply timed token by token, next to a bare forward loop.

They run on the engine's public surface only: ``engine.model``, ``engine.tokenizer``, ``engine.few_shot``,
``engine.reply_prompt_ids``, ``engine.reply``/``reply_batch`` and the replier's ``prompt_cache`` (cleared, so that
rounds do not read each other's prompts); the KV cache is passed as ``cache=`` (transformers 5).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from worker.tools.bench_probes import REPLY_PROMPT


def naive_label(engine: Any, text: str, max_new_tokens: int = 10) -> str:
    """The reference recipe: render the whole prompt, generate a few tokens greedily, look for a label word."""
    import torch

    from worker import prompts

    tok = engine.tokenizer
    enc = tok.apply_chat_template(
        prompts.sentiment_messages(text, engine.few_shot),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
        )
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).lower()
    found = [(answer.find(w.lower()), label) for w, label in zip(prompts.LABEL_WORDS, prompts.LABELS, strict=True)]
    found = [(pos, label) for pos, label in found if pos >= 0]
    return min(found)[1] if found else "unknown"


def forced_length(new_tokens: int) -> dict[str, Any]:
    """generate() arguments that decode exactly ``new_tokens`` tokens, as llama.cpp's timed rounds do: no stop id
    at all (an empty list; None would mean the model's own). Not ``min_new_tokens``: its logits processor (and the
    ``min_length`` one it brings) masks the stop ids over the whole vocabulary at every step, ~2 ms a step for one
    row of Qwen2's 151,936 logits on 2 cores, a cost neither the worker's replies nor llama.cpp pay."""
    return {"max_new_tokens": new_tokens, "eos_token_id": []}


class _TokenClock:
    """A generate() streamer that only notes when each token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class ReplyTiming:
    prompt_tokens: int
    new_tokens: int
    first_token_seconds: float
    decode_tokens_per_second: float
    loop_tokens_per_second: float

    def best(self, other: ReplyTiming) -> ReplyTiming:
        """The better of two rounds, figure by figure: a neighbour's burst can only slow a round."""
        return ReplyTiming(
            self.prompt_tokens,
            self.new_tokens,
            min(self.first_token_seconds, other.first_token_seconds),
            max(self.decode_tokens_per_second, other.decode_tokens_per_second),
            max(self.loop_tokens_per_second, other.loop_tokens_per_second),
        )


def time_reply(engine: Any, new_tokens: int) -> ReplyTiming:
    """Time to first token and decode rate of a greedy reply forced to ``new_tokens`` tokens.

    Also decodes the same number of tokens with a bare forward loop (no logits processors, no stopping
    criteria): the gap between the two is generate()'s own overhead."""
    import torch

    from worker.engine import packed_kernels_only

    ids, _ = engine.reply_prompt_ids([], REPLY_PROMPT)
    clock = _TokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode(), packed_kernels_only():  # as the worker's replies run
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **forced_length(new_tokens),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=engine.tokenizer.pad_token_id,
            streamer=clock,
        )
    n = int(out.shape[1] - ids.shape[1])
    first = clock.times[1] - t0
    rate = (n - 1) / (clock.times[-1] - clock.times[1]) if n > 1 else 0.0

    # The floor: prefill, then one forward per token on the growing cache, argmax in between.
    with torch.inference_mode(), packed_kernels_only():
        res = engine.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = res.logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            res = engine.model(input_ids=nxt, use_cache=True, logits_to_keep=1, cache=res.cache)
            nxt = res.logits[:, -1:].argmax(-1)
        loop_rate = (new_tokens - 1) / (time.perf_counter() - t1) if new_tokens > 1 else 0.0
    return ReplyTiming(int(ids.shape[1]), n, first, rate, loop_rate)


def time_batched_reply(engine: Any, new_tokens: int, batch: int) -> float:
    """Decode tokens per second of ``batch`` greedy replies decoded together (all rows counted), forced to
    ``new_tokens`` tokens each, after the prefill: what the bulk path's reply batches run at.

    The prompts differ (a different question per row) and are left-padded, as ``Engine.reply_batch`` does."""
    import torch

    from worker.engine import packed_kernels_only

    prompts = [engine.reply_prompt_ids([], f"{REPLY_PROMPT} ({i + 1})")[0] for i in range(batch)]
    longest = max(int(p.shape[1]) for p in prompts)
    pad = engine.tokenizer.pad_token_id or 0
    ids = torch.full((batch, longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - p.shape[1] :], mask[row, longest - p.shape[1] :] = p[0], 1
    clock = _TokenClock()
    with torch.inference_mode(), packed_kernels_only():  # as Engine.reply_batch runs
        engine.model.generate(input_ids=ids, attention_mask=mask, **forced_length(new_tokens), do_sample=False,
                              temperature=None, top_p=None, top_k=None,
                              pad_token_id=pad, streamer=clock)
    steps = len(clock.times) - 1  # the first put is the prompt
    return batch * (steps - 1) / (clock.times[-1] - clock.times[1]) if steps > 1 else 0.0


def messages_with_replies(engine: Any, texts: list[str], new_tokens: int) -> float:
    """Messages per second of the bulk path with replies: sentiment of ``texts`` in batches, then their greedy
    replies of at most ``new_tokens`` tokens, ``reply_batch_size`` at a time (the product's calls)."""
    with greedy(engine, new_tokens):
        t0 = time.perf_counter()
        engine.classify(texts)
        size = engine.settings.reply_batch_size
        for start in range(0, len(texts), size):
            engine.reply_batch([([], t) for t in texts[start : start + size]])
        return len(texts) / (time.perf_counter() - t0)


@contextlib.contextmanager
def greedy(engine: Any, new_tokens: int, **settings: Any) -> Iterator[None]:
    """The engine's replies greedy and at most ``new_tokens`` long inside the block (and ``settings``), starting
    from an empty prompt cache: each timed run's messages are new conversations, not a replay of the last run's."""
    saved = engine.settings
    engine.settings = saved.model_copy(update={"do_sample": False, "max_new_tokens": new_tokens, **settings})
    engine.replier.prompt_cache.clear()
    try:
        yield
    finally:
        engine.settings = saved
        engine.replier.prompt_cache.clear()


@dataclass
class ConversationTiming:
    first_token_seconds: list[float]  # per turn, from the call to the first new token
    prompt_tokens: list[int]
    cached_prompt_tokens: list[int]
    texts: list[str]

    @property
    def computed_per_reply(self) -> float:
        return sum(p - c for p, c in zip(self.prompt_tokens, self.cached_prompt_tokens, strict=True)) / len(self.texts)


def time_conversation(engine: Any, texts: list[str], new_tokens: int, cache: bool) -> ConversationTiming:
    """One conversation of ``texts`` as successive turns (each reply greedy, at most ``new_tokens`` tokens, seen by
    the later turns), with the kept prompt cache on or off (``ALLINONE_PROMPT_CACHE_MB``): the time to each reply's
    first token and how many of its prompt tokens were computed."""
    timing = ConversationTiming([], [], [], [])
    history: list[tuple[str, str]] = []
    with greedy(engine, new_tokens, **({} if cache else {"prompt_cache_mb": 0})):
        for text in texts:
            t0 = time.time()
            r = engine.reply(history, text)
            timing.first_token_seconds.append((r.first_token_at or time.time()) - t0)
            timing.prompt_tokens.append(r.prompt_tokens)
            timing.cached_prompt_tokens.append(r.cached_prompt_tokens)
            timing.texts.append(r.text)
            history.append((text, r.text))
    return timing
