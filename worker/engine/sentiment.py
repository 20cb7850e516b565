"""Sentiment in one forward pass, as three stages: preprocess -> forward -> postprocess.

At load, the sentiment prompt's fixed part (instruction and few-shot turns, :mod:`worker.prompts`) runs once and its
key/value cache is kept (:class:`SentimentPipeline` construction). With a sentiment adapter
(:mod:`worker.engine.adapter`) every forward pass here runs with it on, the prefix's too; nothing else does.
Then, for a list of messages:

- **preprocess**: each message becomes its own tokens (cut to the token budget) followed by the prompt's suffix;
  messages are packed one after another into passes of at most a token budget, each token seeing the prefix and
  its own message only (:mod:`worker.engine.batching`): no padding, and one pass where padded batches needed several.
- **forward**: the decoder runs a pass on a copy of the prefix cache; we keep the final hidden state at each
  message's last token, and the inner layers' states a head asks for.
- **postprocess**: two rows of the LM head (the label words' first tokens) turn a hidden state into two logits
  (two dot products instead of a vocabulary-wide projection); :meth:`SentimentPipeline.sentiments` turns scores into
  labels, through the sentiment head when one is loaded.

:meth:`SentimentPipeline.score_plain` is the reference the fast path is tested against: the whole prompt in one
ordinary forward pass, full LM head, no cache, no batch.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from worker import prompts
from worker.engine import attention
from worker.engine.adapter import SentimentAdapter
from worker.engine.batching import pack, pack_batches
from worker.engine.identity import decoder_of
from worker.errors import ModelLoadError
from worker.schemas import Sentiment


@dataclass
class Scores:
    """Raw sentiment scores of a batch: the two label logits and the hidden state they were read from."""

    label_logits: torch.Tensor  # [B, 2] (positive, negative)
    hidden: torch.Tensor  # [B, H] final hidden state at each message's last token
    # {n: [B, H]}: the residual stream after decoder layer n at the last token, for the layers a head reads
    layers: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def p_positive(self) -> torch.Tensor:
        return torch.softmax(self.label_logits.float(), dim=-1)[:, 0]


@dataclass
class Batch:
    """Messages packed for one forward pass on the cached prefix (:func:`worker.engine.batching.pack`)."""

    rows: list[int]  # the position of each message in the list being scored
    input_ids: torch.Tensor  # [1, T]: the messages' tokens one after another
    position_ids: torch.Tensor  # [1, T]: each message's positions as it would have them alone
    attention_mask: torch.Tensor  # [1, 1, T, prefix + T] boolean: the prefix and the token's own message
    last: torch.Tensor  # [n]: the index of each message's last token in input_ids

    @property
    def lengths(self) -> list[int]:
        """Each message's token count (for :mod:`worker.engine.attention`)."""
        return torch.diff(self.last, prepend=torch.tensor([-1])).tolist()


class SentimentPipeline:
    """Scores messages on the cached sentiment prefix of one loaded model. Built once, at load."""

    def __init__(self, tokenizer: Any, model: Any, few_shot: tuple[tuple[str, str], ...],
                 adapter: SentimentAdapter | None = None) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.few_shot = few_shot
        self.adapter = adapter  # attached to ``model``; on for every sentiment forward pass, the prefix's too
        ids = prompts.label_token_ids(tokenizer)
        if len(ids) != len(prompts.LABEL_WORDS):
            raise ModelLoadError(f"the tokenizer produced no token for a label word of {prompts.LABEL_WORDS}")
        self.label_ids: tuple[int, int] = (ids[0], ids[1])
        if self.label_ids[0] == self.label_ids[1]:
            raise ModelLoadError(f"the label words {prompts.LABEL_WORDS} start with the same token")
        out_emb = model.get_output_embeddings()
        # A quantised head (worker.engine.quant) has no float weight: it gives the rows asked for (an int4 head keeps
        # these two from the float weights).
        rows = getattr(out_emb, "weight_rows", None)
        w = rows(list(self.label_ids)) if rows is not None else out_emb.weight[list(self.label_ids)]
        b = getattr(out_emb, "bias", None)
        self.label_weights = w.detach().float().clone()  # [2, H]
        self.label_bias = b[list(self.label_ids)].detach().float().clone() if b is not None else None

        # Split the rendered sentiment prompt around a marker: what comes before is the same for every message.
        marker = "\x00MESSAGE\x00"
        rendered = tokenizer.apply_chat_template(
            prompts.sentiment_messages(marker, few_shot), tokenize=False, add_generation_prompt=True
        )
        head, tail = rendered.split(marker)
        self.prefix_ids: list[int] = tokenizer(head, add_special_tokens=False)["input_ids"]
        self.suffix_ids: list[int] = tokenizer(tail, add_special_tokens=False)["input_ids"]
        self.prefix_cache = self.compute_prefix()

    def adapted(self) -> contextlib.AbstractContextManager[None]:
        """The sentiment adapter in the model for a block (nothing without one)."""
        return self.adapter.active() if self.adapter is not None else contextlib.nullcontext()

    def compute_prefix(self, trainable: bool = False) -> Any:
        """The key/value cache of the prompt's fixed part, with the adapter on. ``trainable``: under no_grad
        instead of inference mode, so a training step may build on it (inference tensors cannot be saved for
        backward)."""
        with torch.no_grad() if trainable else torch.inference_mode(), self.adapted():
            return self.decoder(input_ids=torch.tensor([self.prefix_ids]), use_cache=True).cache

    def use_adapter(self, adapter: SentimentAdapter | None) -> None:
        """Score with ``adapter`` (attached to this model) from now on, or without one; the prefix is recomputed."""
        self.adapter = adapter
        self.prefix_cache = self.compute_prefix()

    @property
    def decoder(self) -> Any:
        """The transformer body without the LM head (its last hidden state is already normed)."""
        return decoder_of(self.model)

    @property
    def hidden_size(self) -> int:
        return int(self.label_weights.shape[1])

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    # ------------------------------------------------------------------------------------------- preprocess
    def message_ids(self, text: str, max_tokens: int) -> list[int]:
        """A message's own tokens in the sentiment prompt: its text (cut to ``max_tokens``) and the suffix."""
        # split_special_tokens: a user's "<|im_end|>" is plain text here, never a turn boundary.
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids[:max_tokens] + self.suffix_ids

    def preprocess(self, texts: list[str], batch_size: int, max_tokens: int,
                   batch_tokens: int | None = None) -> list[Batch]:
        """Messages as packed passes of at most ``batch_size`` messages and ``batch_tokens`` tokens (a lone
        longer message excepted), in their order."""
        encoded = [self.message_ids(t, max_tokens) for t in texts]
        return [self.batch([encoded[i] for i in rows], rows)
                for rows in pack_batches([len(e) for e in encoded], batch_size, batch_tokens)]

    def batch(self, seqs: list[list[int]], rows: list[int]) -> Batch:
        ids, positions, mask, last = pack(seqs, prefix_len=len(self.prefix_ids))
        return Batch(rows=rows, input_ids=ids, position_ids=positions, attention_mask=mask, last=last)

    # ------------------------------------------------------------------------------------------- forward
    def _packed(self, batch: Batch) -> dict[str, Any]:
        """The keyword that turns on message-by-message attention (:mod:`worker.engine.attention`), for a model
        running it; any other attention implementation gets the mask alone."""
        if not attention.runs_packed(self.model):
            return {}
        return {"packed_lengths": batch.lengths}

    def run_on_prefix(self, batch: Batch, **kw: Any) -> Any:
        """The decoder's output for a batch on top of the cached prefix; ``kw`` goes to the decoder
        (e.g. ``output_hidden_states=True`` for experiments on other layers)."""
        # The forward pass appends to the cache it is given: hand it a copy (one row: the pass is one sequence).
        with torch.inference_mode(), self.adapted():
            return self.decoder(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                attention_mask=batch.attention_mask, use_cache=True,
                                cache=copy.deepcopy(self.prefix_cache), **self._packed(batch), **kw)

    def train_logits(self, batch: Batch, prefix_cache: Any) -> torch.Tensor:
        """The two label logits [n, 2] of a batch with autograd on, for training the adapter: ``prefix_cache``
        from ``compute_prefix(trainable=True)`` (left unchanged; gradients do not flow into it)."""
        with self.adapted():
            out = self.decoder(input_ids=batch.input_ids, position_ids=batch.position_ids,
                               attention_mask=batch.attention_mask, use_cache=True, cache=copy.deepcopy(prefix_cache),
                               **self._packed(batch))
        return self.postprocess(out.last_hidden_state[0, batch.last].float())

    def forward(self, batch: Batch, layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The final hidden state at each message's last token [n, H], and the states of ``layers`` there."""
        # Inner states cost nothing extra to compute: the decoder only keeps references to them.
        out = self.run_on_prefix(batch, **({"output_hidden_states": True} if layers else {}))
        with torch.inference_mode():
            hidden = out.last_hidden_state[0, batch.last].float()  # after the final norm
            # hidden_states[0] is the embedding output, [k] the output of decoder layer k
            states = {k: out.hidden_states[k][0, batch.last].float() for k in layers}
        return hidden, states

    # ------------------------------------------------------------------------------------------- postprocess
    def postprocess(self, hidden: torch.Tensor) -> torch.Tensor:
        """The two label logits [n, 2] (positive, negative) of final hidden states [n, H]."""
        lg = hidden @ self.label_weights.T
        if self.label_bias is not None:
            lg = lg + self.label_bias
        if self.adapter is not None and self.adapter.label_offset:
            lg = lg + torch.tensor([self.adapter.label_offset, 0.0])
        return lg

    def sentiments(self, scores: Scores, head: Any = None) -> list[Sentiment]:
        """Labels and confidences: the head's probability when one is given, else the prompt's."""
        method = "prompt+adapter" if self.adapter is not None else "prompt"
        if head is not None:
            p_pos, method = head.p_positive(scores), method + "+head"
        else:
            p_pos = scores.p_positive
        return [Sentiment.from_p_positive(p, method) for p in p_pos.tolist()]

    # ------------------------------------------------------------------------------------------- the stages
    def score(self, texts: list[str], batch_size: int, max_tokens: int, layers: tuple[int, ...] = (),
              batch_tokens: int | None = None) -> Scores:
        """Label logits and hidden states of many messages, batched, on the cached prefix, in ``texts`` order."""
        for n in layers:
            if not 1 <= n <= self.num_layers:
                raise ValueError(f"layer {n} is not a layer of this model (1..{self.num_layers})")
        logits = torch.empty(len(texts), 2)
        hidden = torch.empty(len(texts), self.hidden_size)
        inner = {n: torch.empty(len(texts), self.hidden_size) for n in layers}
        for batch in self.preprocess(texts, batch_size, max_tokens, batch_tokens):
            hd, states = self.forward(batch, layers)
            logits[batch.rows] = self.postprocess(hd)
            hidden[batch.rows] = hd
            for n in layers:
                inner[n][batch.rows] = states[n]
        return Scores(label_logits=logits, hidden=hidden, layers=inner)

    def score_plain(self, text: str, max_tokens: int) -> Scores:
        """The reference: the whole prompt in one ordinary forward pass, no cache, no batch, read through the same
        two label rows (an int4 head's full-precision ones, not its 4-bit logits)."""
        ids = torch.tensor([self.prefix_ids + self.message_ids(text, max_tokens)])
        with torch.inference_mode(), self.adapted():
            out = self.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][0, -1:].float()  # after the final norm
        return Scores(
            label_logits=self.postprocess(hidden),
            hidden=hidden,
            layers={k: out.hidden_states[k][0, -1:].float() for k in range(1, self.num_layers + 1)},
        )
