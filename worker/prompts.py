"""Every prompt of the product, and how user text is kept from steering them.

Sentiment is *scored*, not parsed: the model sees the prompt below, and we compare its next-token logits for the
first tokens of the two label words. Whatever a user writes, the answer is one of the two labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

# The labels as the model is asked to answer them, in the order of ``LABELS``.
LABEL_WORDS: tuple[str, str] = ("Positive", "Negative")
LABELS: tuple[str, str] = ("positive", "negative")

SENTIMENT_SYSTEM = (
    "You classify the sentiment of user messages (reviews, feedback, chat) in any language. "
    "Answer with one word: Positive or Negative."
)
# The message goes last, after a newline, so the cached prefix ends on a token boundary.
SENTIMENT_USER_HEAD = "Message:\n"

# Few-shot examples shown as earlier turns of the sentiment prompt, picked from the train splits (never dev or
# test): short, unambiguous, both languages and both labels, alternating so no label sits last.
FEW_SHOT: tuple[tuple[str, str], ...] = (
    ("地理位置佳，交通方便，酒店服务、设施都不错，以后有机会还住这里。", "positive"),
    ("Its premise is smart, but the execution is pretty weary.", "negative"),
    ("作者的文笔一般，观点也是和市面上的同类书大同小异，不推荐读者购买。", "negative"),
    ("A remarkable film by Bernard Rose.", "positive"),
    ("环境较差，马路噪音非常大，而且房间之间的隔音处理得不好。", "negative"),
    ("Trust and deceit, generosity and meanness are fleshed out by a deft cast.", "positive"),
    ("外观很漂亮，做工非常好，速度很快，音响效果也不错。", "positive"),
    ("Each scene drags, underscoring the obvious, and sentiment is slathered on top.", "negative"),
)

# Used only when a tokenizer ships without a chat template (ChatML, which Qwen and SmolLM2 use).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def sentiment_messages(text: str, few_shot: Sequence[tuple[str, str]] = FEW_SHOT) -> list[dict[str, str]]:
    """The chat of the sentiment prompt for one message (before the assistant's one-word answer)."""
    msgs = [{"role": "system", "content": SENTIMENT_SYSTEM}]
    for example, label in few_shot:
        msgs.append({"role": "user", "content": SENTIMENT_USER_HEAD + example})
        msgs.append({"role": "assistant", "content": LABEL_WORDS[LABELS.index(label)]})
    msgs.append({"role": "user", "content": SENTIMENT_USER_HEAD + text})
    return msgs


def label_token_ids(tokenizer: Any) -> list[int]:
    """The first token of each label word (``LABEL_WORDS`` order): the two LM-head rows sentiment is scored by.
    A word the tokenizer gives no token for is skipped (the sentiment pipeline refuses such a tokenizer)."""
    out = []
    for word in LABEL_WORDS:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if ids:
            out.append(int(ids[0]))
    return out


def prompt_fingerprint(few_shot: Sequence[tuple[str, str]] | None = None) -> str:
    """A short hash of the sentiment prompt (instruction, label words, few-shot turns).

    A sentiment head is trained on the states this prompt leads to: it records this hash and the engine refuses it
    under another prompt."""
    blob = json.dumps([SENTIMENT_SYSTEM, SENTIMENT_USER_HEAD, LABEL_WORDS,
                       list(few_shot if few_shot is not None else FEW_SHOT)])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def reply_messages(system: str, history: Iterable[tuple[str, str]], text: str) -> list[dict[str, str]]:
    """The chat of the reply prompt: system, the earlier (user, reply) turns, then this message."""
    msgs = [{"role": "system", "content": system}]
    for user, assistant in history:
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": assistant})
    msgs.append({"role": "user", "content": text})
    return msgs


def neutralize(text: str, special_tokens: Iterable[str]) -> str:
    """User text with every special-token string broken up, so it tokenizes as plain text.

    Without this a message holding ``<|im_end|>\\n<|im_start|>system`` would open a new system turn of its own.
    A zero-width joiner after the first character keeps the text readable to the model but unmatchable by the
    tokenizer's special-token splitter. The stored text is left as the user wrote it.
    """
    for tok in sorted({t for t in special_tokens if t and len(t) > 1}, key=len, reverse=True):
        if tok in text:
            text = text.replace(tok, tok[0] + "\u200d" + tok[1:])
    return text
