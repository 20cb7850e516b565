"""Chat replies: the prompt (history that fits, chat template, user text kept plain), the decode, the result.

A reply is ``prompt_ids`` -> ``generate`` -> decode. :meth:`Replier.generate` is the seam for a faster decoder:
it takes the prompt's token ids and returns the new token ids, within ``max_new_tokens`` and the wall-clock bound;
everything around it (what the prompt holds, how the result is judged) stays here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from worker import prompts
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
    def generate(self, ids: torch.Tensor, settings: Settings) -> torch.Tensor:
        """The new token ids [N] after prompt ``ids`` [1, T]: at most ``max_new_tokens``, ending at a stop token,
        or cut at ``reply_timeout_seconds``."""
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
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
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
        return out[0, ids.shape[1] :]

    # ------------------------------------------------------------------------------------------- the reply
    def reply(self, history: list[tuple[str, str]], text: str, settings: Settings) -> Reply:
        """A chat reply to ``text`` that sees the earlier (user, reply) turns that fit the history budget."""
        ids, kept = self.prompt_ids(history, text, settings)
        t0 = time.perf_counter()
        new = self.generate(ids, settings)
        seconds = time.perf_counter() - t0
        stopped = len(new) > 0 and int(new[-1]) in self.stop_ids
        timed_out = (not stopped) and len(new) < settings.max_new_tokens and seconds >= settings.reply_timeout_seconds
        return Reply(
            text=self.tokenizer.decode(new, skip_special_tokens=True).strip(),
            new_tokens=int(len(new)),
            prompt_tokens=int(ids.shape[1]),
            history_turns=kept,
            seconds=seconds,
            timed_out=timed_out,
        )
