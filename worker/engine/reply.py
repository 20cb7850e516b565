"""Chat replies: the prompt (history that fits, chat template, user text kept plain), the decode, the result.

A reply is ``prompt_ids`` -> ``generate`` -> decode. :meth:`Replier.generate` is the seam for a faster decoder:
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
from transformers.generation.streamers import BaseStreamer

from worker import prompts
from worker.engine import quant
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
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        gen = self._generate_kwargs(settings)
        if on_token is not None:
            gen["streamer"] = _TokenStreamer(on_token)
        with torch.inference_mode(), quant.packed_kernels_only():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
        return out[0, ids.shape[1] :]

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
        if len(prompts_ids) == 1:
            return [self.generate(prompts_ids[0], settings)]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(int(p.shape[1]) for p in prompts_ids)
        ids = torch.full((len(prompts_ids), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts_ids):
            ids[row, longest - p.shape[1] :] = p[0]
            mask[row, longest - p.shape[1] :] = 1
        with torch.inference_mode(), quant.packed_kernels_only():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **self._generate_kwargs(settings))
        new = []
        for row in out[:, longest:]:
            ends = [i for i, t in enumerate(row.tolist()) if t in self.stop_ids]
            new.append(row[: ends[0] + 1] if ends else row)
        return new

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
        new = self.generate(ids, settings, on_token=on_token)
        return self._result(new, ids, kept, time.perf_counter() - t0, settings, first[0] if first else None)

    def reply_batch(self, items: list[tuple[list[tuple[str, str]], str]], settings: Settings) -> list[Reply]:
        """Replies to several (history, text) pairs decoded in one batch (the bulk path; no streaming)."""
        prompts_ids = [self.prompt_ids(history, text, settings) for history, text in items]
        t0 = time.perf_counter()
        news = self.generate_batch([ids for ids, _ in prompts_ids], settings)
        seconds = time.perf_counter() - t0
        return [self._result(new, ids, kept, seconds, settings, None)
                for new, (ids, kept) in zip(news, prompts_ids, strict=True)]

    def _result(self, new: torch.Tensor, ids: torch.Tensor, kept: int, seconds: float, settings: Settings,
                first_token_at: float | None) -> Reply:
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
        )
