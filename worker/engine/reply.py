"""Chat replies: the prompt (history that fits, chat template, user text kept plain), the decode, the result.

A reply is ``prompt_ids`` -> ``generate`` -> decode; ``generate`` computes the prompt alone first (``prefill``: on
the keys and values kept from an earlier prompt that begins the same way, :mod:`worker.engine.prompt_cache`), then
decodes. :meth:`Replier.generate` is the seam for a faster decoder:
it takes the prompt's token ids and returns the new token ids, within ``max_new_tokens`` and the wall-clock bound,
and hands each new token id to ``on_token`` as soon as it is chosen (that is how a reply streams); everything
around it (what the prompt holds, the text deltas of a streamed reply, how the result is judged) stays here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from worker import prompts
from worker.engine import quant
from worker.engine.identity import decoder_of
from worker.engine.prompt_cache import MIB, PromptCache, row_layers, stack_left_padded
from worker.settings import Settings

# Role markers and separators a chat template adds around one turn, in tokens (budget estimate).
TURN_OVERHEAD_TOKENS = 8


@dataclass
class Reply:
    text: str
    new_tokens: int
    prompt_tokens: int
    history_turns: int
    seconds: float
    timed_out: bool = False
    first_token_at: float | None = None  # wall time the first new token was chosen (streaming latency is from it)
    cached_prompt_tokens: int = 0  # the prompt's tokens whose keys and values came from the kept cache, not computed


class TextDeltas:
    """A reply's text as it grows, token by token: each call returns the text the new tokens add.

    Decoding a token alone can be wrong (a byte-level BPE splits a Chinese character or an emoji across tokens; a
    decoder may merge spaces across tokens), so each call decodes a short window of recent tokens twice, with and
    without the new ones, and returns the difference (the way TGI and vLLM detokenise incrementally); text that
    ends in a partial UTF-8 character is held back until the token that completes it. Work per token is constant.
    """

    def __init__(self, tokenizer: Any) -> None:
        # A fast tokenizer's Rust decoder directly: the same text, without the Python wrapper's cost on every token
        # (it runs inside the decode loop).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None else tokenizer.decode
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are decoded and said
        self._read = 0  # tokens before this are said

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        said = self._decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        now = self._decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(now) <= len(said) or now.endswith("\ufffd"):
            return ""  # nothing yet, or half a character
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(said) :]


def _time_left(settings: Settings, since: float) -> float:
    """What is left of a reply's wall-clock bound for generate(), its prompt having been computed since ``since``
    (the bound covers the prompt too, as it did when generate() computed it)."""
    return max(settings.reply_timeout_seconds - (time.perf_counter() - since), 1e-3)


class _TokenStreamer(BaseStreamer):
    """transformers' streamer hook: hands each new token id to a callback (the prompt, put first, is skipped)."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.on_token(token_id)

    def end(self) -> None:
        pass


class Replier:
    """Writes chat replies with one loaded model. Settings come with each call (they may change between calls)."""

    def __init__(self, tokenizer: Any, model: Any) -> None:
        self.tokenizer = tokenizer
        self.model = model
        # Every string the tokenizer would read as a special token: broken up in user text (prompts.neutralize).
        self.specials = [str(t) for t in tokenizer.all_special_tokens] + [
            str(t.content)
            for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
            if getattr(t, "special", False)
        ]
        eos = tokenizer.eos_token_id
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = sorted(
            {i for i in (eos, im_end) if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id}
        )
        self.prompt_cache = PromptCache(0)  # sized by each call's settings (ALLINONE_PROMPT_CACHE_MB)
        # Prompts are computed ahead of generate() where the model's cache is one plain key/value layer per
        # decoder layer (what a kept entry and a batch's rows are cut from and stacked into); any other cache
        # (sliding windows) leaves the whole prompt to generate().
        self.prefills = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)

    # ------------------------------------------------------------------------------------------- the prompt
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit_history(self, history: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
        """The most recent earlier turns whose tokens fit ``budget``, oldest first."""
        kept: list[tuple[str, str]] = []
        for user, assistant in reversed(history):
            cost = self.count_tokens(user) + self.count_tokens(assistant) + TURN_OVERHEAD_TOKENS
            if cost > budget:
                break
            budget -= cost
            kept.append((user, assistant))
        return kept[::-1]

    def prompt_ids(self, history: list[tuple[str, str]], text: str, settings: Settings) -> tuple[torch.Tensor, int]:
        """The reply prompt's token ids [1, T] and how many earlier turns it holds."""
        kept = self.fit_history(history, settings.history_tokens)
        n = lambda t: prompts.neutralize(t, self.specials)  # noqa: E731
        msgs = prompts.reply_messages(settings.system_prompt, [(n(u), n(a)) for u, a in kept], n(text))
        enc = self.tokenizer.apply_chat_template(
            msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"], len(kept)

    # ------------------------------------------------------------------------------------------- the decode
    def generate(
        self, ids: torch.Tensor, settings: Settings, on_token: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """The new token ids [N] after prompt ``ids`` [1, T]: at most ``max_new_tokens``, ending at a stop token,
        or cut at ``reply_timeout_seconds``. ``on_token`` gets each new id as soon as it is chosen, in order; an
        exception it raises ends the decode."""
        return self._generate(ids, settings, on_token)[0]

    def _generate(self, ids: torch.Tensor, settings: Settings,
                  on_token: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
        """:meth:`generate`, and how many prompt tokens came from the kept cache."""
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        gen = self._generate_kwargs(settings)
        if on_token is not None:
            gen["streamer"] = _TokenStreamer(on_token)
        t0 = time.perf_counter()
        cache, reused = self.prefill(ids, settings)
        if cache is not None:
            gen.update(cache=cache, max_time=_time_left(settings, t0))
        with torch.inference_mode(), quant.packed_kernels_only():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
        if cache is not None:
            n = cache.get_seq_length()
            self.prompt_cache.put(out[0, :n], row_layers(cache, 0, 0, n))
        return out[0, ids.shape[1] :], reused

    def prefill(self, ids: torch.Tensor, settings: Settings) -> tuple[DynamicCache | None, int]:
        """The key/value cache of prompt ``ids`` [1, T] but its last token (the decode's first step reads that
        one), built on the kept entry that shares the longest beginning with it, and how many tokens came from
        there; ``(None, 0)`` for a model whose prompt generate() computes itself.

        A prompt runs alone, whatever batch its reply decodes in: its numbers do not depend on the batch (a row's
        greedy reply equals its single one), no padding is computed, and a long prompt takes the quantised layers'
        fast path (:mod:`worker.engine.quant`), as any pass of many rows does. Decode steps stay on the packed
        kernels."""
        if not self.prefills:
            return None, 0
        self.prompt_cache.resize(settings.prompt_cache_mb * MIB)
        head = ids[0, :-1]
        layers, reused = self.prompt_cache.take(head)
        cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
        if reused < head.numel():
            with torch.inference_mode():
                decoder_of(self.model)(input_ids=head[None, reused:], cache=cache, use_cache=True)
        return cache, reused

    def _generate_kwargs(self, settings: Settings) -> dict[str, Any]:
        gen: dict[str, Any] = dict(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            repetition_penalty=settings.repetition_penalty,
            eos_token_id=self.stop_ids or None,
            pad_token_id=self.tokenizer.pad_token_id,
            # A wall-clock bound enforced inside generate(): it works under the solo pool, where Celery's own
            # time limits are not enforced.
            max_time=settings.reply_timeout_seconds,
        )
        if settings.do_sample:
            gen.update(temperature=settings.temperature, top_p=settings.top_p)
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        return gen

    def generate_batch(self, prompts_ids: list[torch.Tensor], settings: Settings) -> list[torch.Tensor]:
        """The new token ids of several prompts ([1, T_i] each) decoded together: left-padded so every row's
        next token is at the same column; a row that meets a stop token is finished (generate pads it after);
        the wall-clock bound holds for the batch, so for every row. Under greedy decoding each row equals its
        own :meth:`generate`."""
        return self._generate_batch(prompts_ids, settings)[0]

    def _generate_batch(self, prompts_ids: list[torch.Tensor],
                        settings: Settings) -> tuple[list[torch.Tensor], list[int]]:
        """:meth:`generate_batch`, and how many of each prompt's tokens came from the kept cache."""
        if len(prompts_ids) == 1:
            new, reused = self._generate(prompts_ids[0], settings)
            return [new], [reused]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(int(p.shape[1]) for p in prompts_ids)
        ids = torch.full((len(prompts_ids), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts_ids):
            ids[row, longest - p.shape[1] :] = p[0]
            mask[row, longest - p.shape[1] :] = 1
        gen = self._generate_kwargs(settings)
        t0 = time.perf_counter()
        prefilled = [self.prefill(p, settings) for p in prompts_ids]
        caches = [c for c, _ in prefilled]
        cache = None
        if all(c is not None for c in caches) and longest > 1:
            cache = DynamicCache(ddp_cache_data=stack_left_padded(caches, longest - 1), config=self.model.config)
            gen.update(cache=cache, max_time=_time_left(settings, t0))
        with torch.inference_mode(), quant.packed_kernels_only():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **gen)
        new = []
        for row, p in enumerate(prompts_ids):
            tokens = out[row, longest:]
            ends = [i for i, t in enumerate(tokens.tolist()) if t in self.stop_ids]
            new.append(tokens[: ends[0] + 1] if ends else tokens)
            if cache is not None:  # the row's own tokens: not its left padding, nor what follows its stop token
                start, end = longest - p.shape[1], min(cache.get_seq_length(), longest + len(new[-1]))
                self.prompt_cache.put(out[row, start:end], row_layers(cache, row, start, end), copy=True)
        return new, [r for _, r in prefilled]

    # ------------------------------------------------------------------------------------------- the reply
    def reply(
        self,
        history: list[tuple[str, str]],
        text: str,
        settings: Settings,
        on_text: Callable[[str], None] | None = None,
    ) -> Reply:
        """A chat reply to ``text`` that sees the earlier (user, reply) turns that fit the history budget.

        ``on_text`` gets the reply's text as it is written, piece by piece (called from inside the decode: it must
        be quick). Its pieces joined are the reply before the final strip of surrounding whitespace."""
        ids, kept = self.prompt_ids(history, text, settings)
        first: list[float] = []
        deltas = TextDeltas(self.tokenizer) if on_text is not None else None

        def on_token(token_id: int) -> None:
            if not first:
                first.append(time.time())
            if deltas is not None and on_text is not None:
                on_text(deltas.push(token_id))

        t0 = time.perf_counter()
        new, reused = self._generate(ids, settings, on_token=on_token)
        return self._result(new, ids, kept, time.perf_counter() - t0, settings, first[0] if first else None, reused)

    def reply_batch(self, items: list[tuple[list[tuple[str, str]], str]], settings: Settings) -> list[Reply]:
        """Replies to several (history, text) pairs decoded in one batch (the bulk path; no streaming)."""
        prompts_ids = [self.prompt_ids(history, text, settings) for history, text in items]
        t0 = time.perf_counter()
        news, reused = self._generate_batch([ids for ids, _ in prompts_ids], settings)
        seconds = time.perf_counter() - t0
        return [self._result(new, ids, kept, seconds, settings, None, r)
                for new, (ids, kept), r in zip(news, prompts_ids, reused, strict=True)]

    def _result(self, new: torch.Tensor, ids: torch.Tensor, kept: int, seconds: float, settings: Settings,
                first_token_at: float | None, reused: int = 0) -> Reply:
        stopped = len(new) > 0 and int(new[-1]) in self.stop_ids
        timed_out = (not stopped) and len(new) < settings.max_new_tokens and seconds >= settings.reply_timeout_seconds
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if not stopped:
            # Cut by its token or time bound, a reply can end inside a character that spans several tokens (most
            # Chinese characters do): drop the half character, as the streamed text never showed it.
            text = text.rstrip("\ufffd")
        return Reply(
            text=text.strip(),
            new_tokens=int(len(new)),
            prompt_tokens=int(ids.shape[1]),
            history_turns=kept,
            seconds=seconds,
            timed_out=timed_out,
            first_token_at=first_token_at,
            cached_prompt_tokens=reused,
        )
