"""Packed-pass attention: message by message, it computes what one masked SDPA call over the packed pass computes."""

from __future__ import annotations

import types

import pytest
import torch

from worker.engine import pack
from worker.engine.attention import NAME, packed_sdpa_attention


def _inputs(lengths: list[int], prefix: int, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim, generator=g)
    k = torch.randn(1, kv_heads, prefix + total, dim, generator=g)
    v = torch.randn(1, kv_heads, prefix + total, dim, generator=g)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    return module, q, k, v


def test_message_by_message_equals_the_masked_pass():
    lengths, prefix = [3, 1, 5, 2], 6
    module, q, k, v = _inputs(lengths, prefix)
    _, _, mask, _ = pack([[1] * n for n in lengths], prefix_len=prefix)
    # Without packed lengths the function is transformers' SDPA attention with the block-diagonal mask
    masked, _ = packed_sdpa_attention(module, q, k, v, mask, scaling=0.5)
    packed, _ = packed_sdpa_attention(module, q, k, v, mask, scaling=0.5, packed_lengths=lengths)
    assert packed.shape == masked.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(packed, masked)
    # and a message's output depends on the prefix and its own tokens only
    k2 = k.clone()
    k2[:, :, prefix + 4:] += 1.0  # the keys of messages 2 and 3
    moved, _ = packed_sdpa_attention(module, q, k2, v, mask, scaling=0.5, packed_lengths=lengths)
    torch.testing.assert_close(moved[:, :4], packed[:, :4])
    assert not torch.allclose(moved[:, 4:], packed[:, 4:])


def test_lengths_that_do_not_add_up_are_refused():
    module, q, k, v = _inputs([3, 2], 4)
    with pytest.raises(ValueError, match="do not add up"):
        packed_sdpa_attention(module, q, k, v, None, packed_lengths=[3, 3])


def test_the_engine_runs_its_model_on_packed_attention(tiny_engine):
    # Replies and plain passes go through it too, as transformers' SDPA (tests/test_reply.py, test_sentiment.py)
    assert tiny_engine.model.config._attn_implementation == NAME


def test_a_model_on_another_attention_implementation_scores_the_same_through_the_mask(tiny_engine):
    # Given the tiny model switched back to transformers' own SDPA: packed passes then rely on the mask alone
    texts = ["good", "a much longer and rather negative message about the room", "ok"]
    packed = tiny_engine.score(texts)
    model = tiny_engine.model
    model.set_attn_implementation("sdpa")
    try:
        assert tiny_engine.sentiment._packed(tiny_engine.sentiment.preprocess(texts, 8, 64)[0]) == {}
        masked = tiny_engine.score(texts)
    finally:
        model.set_attn_implementation(NAME)
    torch.testing.assert_close(masked.label_logits, packed.label_logits, atol=1e-4, rtol=1e-4)
