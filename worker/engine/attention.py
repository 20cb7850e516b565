"""The model's attention: transformers' SDPA, except in two places where it computes far more than it needs.

**Packed sentiment passes.** A packed pass (:mod:`worker.engine.batching`) lays T message tokens behind a P-token
prefix. Its block-diagonal mask is right for any attention implementation, but an implementation that takes a mask
computes every one of the T x (P + T) scores and then discards most of the T x T part: for 16 messages of ~38 tokens
behind a 269-token prefix that is 1.7x the scores the messages need, and attention was a quarter of a bulk pass.
Here each message's queries meet the prefix's keys and its own, which computes only the scores that count: at
inference as two matrix products with a softmax between them (:func:`_packed_products`: too few queries a message
for the SDPA kernel's blocking), in training one SDPA call each.

**Decode steps.** With one new token per row, torch's CPU SDPA kernel (flash) spends its time on blocking made for
long queries: 124 us a layer for one row over 100 keys, 677 us for eight rows, where two small float32 matmuls and a
softmax take 55 and 111 us (the same numbers to bf16 rounding). Eight replies decoded together lost 15 ms a step to
it. :func:`decode_attention` is that.

The engine registers :func:`packed_sdpa_attention` with transformers' ``AttentionInterface`` as :data:`NAME` and sets
it on a model that uses SDPA (:func:`use_packed_attention`). Any other pass (a prompt, an ordinary forward pass) is
transformers' SDPA attention, call for call.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "allinone_packed_sdpa"


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          packed_lengths: list[int] | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, or, given ``packed_lengths`` (the token count of each packed message),
    each message's queries over the prefix's keys and its own: two matrix products a message at inference
    (:func:`_packed_products`), one SDPA call a message when gradients are on (training).

    ``query`` [1, heads, T, d]; ``key``/``value`` [1, kv_heads, P + T, d], the P cached prefix positions first."""
    if packed_lengths is None:
        if query.shape[2] == 1 and dropout == 0.0 and not any(kwargs.get(k) is not None for k in _EXTRAS):
            return decode_attention(query, key, value, attention_mask, scaling), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    total = query.shape[2]
    prefix = key.shape[2] - total
    if sum(packed_lengths) != total or prefix < 0:
        raise ValueError(f"packed lengths {sum(packed_lengths)} do not add up to the pass's {total} tokens")
    if not torch.is_grad_enabled() and dropout == 0.0:
        return _packed_products(query, key, value, packed_lengths, scaling), None
    # Keys and values stay at their own head count (SDPA's enable_gqa): each message copies the prefix's keys for
    # its call, and repeated to the query heads first that copy was 7x larger (attention ~10 % slower).
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for start, n, k, v in _messages(key, value, packed_lengths, prefix):
        # The prefix whole, then the message causally: query i sees prefix + i + 1 keys.
        mask = torch.ones(n, prefix + n, dtype=torch.bool).tril(diagonal=prefix)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:start + n], k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _messages(key: torch.Tensor, value: torch.Tensor, lengths: list[int],
              prefix: int) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """For each packed message: where its tokens start in the pass, how many, and the keys and values it attends
    over (the prefix's, then its own), [1, kv_heads, prefix + n, d] each."""
    start = 0
    for n in lengths:
        own = slice(prefix + start, prefix + start + n)
        yield (start, n, torch.cat([key[:, :, :prefix], key[:, :, own]], dim=2),
               torch.cat([value[:, :, :prefix], value[:, :, own]], dim=2))
        start += n


@functools.lru_cache(maxsize=256)
def _later(n: int) -> torch.Tensor:
    """Which of a message's own ``n`` keys each of its queries must not see (its later tokens), [n, n] bool; every
    prefix key is seen. The same in every layer of a pass, so made once."""
    return torch.ones(n, n, dtype=torch.bool).triu(diagonal=1)


def _packed_products(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
                     scaling: float | None) -> torch.Tensor:
    """A packed pass's attention, message by message, as two matrix products with a softmax between them, in the
    activations' dtype: transformers' eager attention, but the softmax written in that dtype. [1, T, heads, d].

    Why not SDPA here: a message's ~40 queries over ~300 keys are too few for its CPU kernel, which ran them at
    ~100 GFLOP/s, a fifth of a bulk pass on Zen 5; the two batched products (the kv heads as the batch, each serving
    its query heads' rows at once) and a mask on the message's own keys alone take about a third of that time
    (docs/benchmark.md). The scores are rounded to the activations' dtype before the softmax, as in transformers'
    eager attention; training keeps SDPA (it stores less for backward)."""
    _, heads, total, d = query.shape
    kv = key.shape[1]
    prefix = key.shape[2] - total
    scale = scaling if scaling is not None else d**-0.5
    out = torch.empty(1, total, heads, d, dtype=query.dtype)
    for start, n, k, v in _messages(key, value, lengths, prefix):
        k, v = k[0], v[0]  # [kv, P + n, d]
        # [heads, n, d] -> [kv, group * n, d]: head h is kv head h // group's, as in SDPA's enable_gqa
        q = query[0, :, start:start + n].reshape(kv, heads // kv * n, d)
        scores = torch.bmm(q, k.transpose(1, 2)).view(kv, heads // kv, n, prefix + n).mul_(scale)
        scores[..., prefix:].masked_fill_(_later(n), float("-inf"))  # only the message's own block has any
        weights = torch.softmax(scores, dim=-1)  # computed in float32 by torch's kernel, rounded once
        o = torch.bmm(weights.view(kv, heads // kv * n, prefix + n), v)  # [kv, group * n, d]
        out[0, start:start + n].copy_(o.view(heads, n, d).transpose(0, 1))
    return out


# What some models add to SDPA's inputs (capped logits, a learned bias, attention sinks): their decode steps keep SDPA.
_EXTRAS = ("softcap", "position_bias", "s_aux")


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None) -> torch.Tensor:
    """Attention of one new token per row over the cache: ``query`` [B, heads, 1, d], ``key``/``value``
    [B, kv_heads, L, d] (grouped: each kv head serves heads / kv_heads query heads), ``attention_mask`` None or
    SDPA's [B or 1, 1, 1, L] (bool: True may attend; float: added). Returns [B, 1, heads, d], SDPA attention's
    layout. In float32: each row's numbers are the same alone and in a batch (greedy replies rely on it)."""
    b, heads, _, d = query.shape
    kv = key.shape[1]
    q = query.float().reshape(b, kv, heads // kv, d)
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    if attention_mask is not None:
        m = attention_mask[..., -1, :].reshape(attention_mask.shape[0], 1, 1, -1)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    out = torch.matmul(scores.softmax(-1), value.float())  # [B, kv, group, d]
    return out.reshape(b, 1, heads, d).to(query.dtype)


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks of ordinary passes: SDPA's


def _implementation(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def runs_packed(model: Any) -> bool:
    """Whether ``model`` runs :func:`packed_sdpa_attention` (a pass may then pass ``packed_lengths``)."""
    return _implementation(model) == NAME


def use_packed_attention(model: Any) -> bool:
    """Switch ``model`` from SDPA to :func:`packed_sdpa_attention` (the same numbers outside packed passes);
    False, and nothing changed, for a model on another implementation (its packed passes use the mask)."""
    if _implementation(model) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return runs_packed(model)
