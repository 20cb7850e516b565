"""Attention for packed sentiment passes: each message attends to the cached prefix and to itself, computed
message by message instead of over the whole packed sequence.

A packed pass (:mod:`worker.engine.batching`) lays T message tokens behind a P-token prefix. Its block-diagonal
mask is right for any attention implementation, but an implementation that takes a mask computes every one of the
T x (P + T) scores and then discards most of the T x T part: for 16 messages of ~38 tokens behind a 269-token
prefix that is 1.7x the scores the messages need, and attention was a quarter of a bulk pass. Here each message's
queries meet the prefix's keys and its own (one SDPA call each), which computes only the scores that count.

The engine registers this function with transformers' ``AttentionInterface`` as :data:`NAME` and sets it on a
model that uses SDPA (:func:`use_packed_attention`). Without the ``packed_lengths`` keyword (every reply, every
ordinary forward pass) it *is* transformers' SDPA attention, call for call.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "allinone_packed_sdpa"


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          packed_lengths: list[int] | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, or, given ``packed_lengths`` (the token count of each packed message),
    one SDPA call per message over the prefix's keys and the message's own.

    ``query`` [1, heads, T, d]; ``key``/``value`` [1, kv_heads, P + T, d], the P cached prefix positions first."""
    if packed_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    total = query.shape[2]
    prefix = key.shape[2] - total
    if sum(packed_lengths) != total or prefix < 0:
        raise ValueError(f"packed lengths {sum(packed_lengths)} do not add up to the pass's {total} tokens")
    outs, start = [], 0
    for n in packed_lengths:
        own = slice(prefix + start, prefix + start + n)
        k = torch.cat([key[:, :, :prefix], key[:, :, own]], dim=2)
        v = torch.cat([value[:, :, :prefix], value[:, :, own]], dim=2)
        # The prefix whole, then the message causally: query i sees prefix + i + 1 keys.
        mask = torch.ones(n, prefix + n, dtype=torch.bool).tril(diagonal=prefix)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:start + n], k, v, attn_mask=mask, dropout_p=dropout, scale=scaling))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


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
