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


# Inference (the worker's passes) runs two matrix products a message; training (gradients on) one SDPA call each.
PATHS = {"inference": torch.inference_mode, "training": torch.enable_grad}


@pytest.mark.parametrize("path", list(PATHS))
def test_message_by_message_equals_the_masked_pass(path):
    lengths, prefix = [3, 1, 5, 2], 6
    module, q, k, v = _inputs(lengths, prefix)
    _, _, mask, _ = pack([[1] * n for n in lengths], prefix_len=prefix)
    # Without packed lengths the function is transformers' SDPA attention with the block-diagonal mask
    masked, _ = packed_sdpa_attention(module, q, k, v, mask, scaling=0.5)
    with PATHS[path]():
        packed, _ = packed_sdpa_attention(module, q, k, v, mask, scaling=0.5, packed_lengths=lengths)
        # and a message's output depends on the prefix and its own tokens only
        k2 = k.clone()
        k2[:, :, prefix + 4:] += 1.0  # the keys of messages 2 and 3
        moved, _ = packed_sdpa_attention(module, q, k2, v, mask, scaling=0.5, packed_lengths=lengths)
    assert packed.shape == masked.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(packed, masked)
    torch.testing.assert_close(moved[:, :4], packed[:, :4])
    assert not torch.allclose(moved[:, 4:], packed[:, 4:])


def test_in_bf16_the_inference_path_stays_within_bf16_rounding_of_float32():
    # The products round the scores to bf16 before the softmax (as transformers' eager attention does); SDPA keeps
    # them in float32. Both must stay close to the float32 result, the products within twice SDPA's own error.
    lengths, prefix = [40, 7, 64], 120
    module, q, k, v = _inputs(lengths, prefix, heads=14, kv_heads=2, dim=64)
    ref, _ = packed_sdpa_attention(module, q, k, v, None, packed_lengths=lengths)  # float32, SDPA
    lo = [t.to(torch.bfloat16) for t in (q, k, v)]
    with torch.inference_mode():
        fast, _ = packed_sdpa_attention(module, *lo, None, packed_lengths=lengths)
    sdpa, _ = packed_sdpa_attention(module, *lo, None, packed_lengths=lengths)
    assert fast.dtype == torch.bfloat16 and fast.shape == ref.shape
    fast_err, sdpa_err = (fast.float() - ref).abs(), (sdpa.float() - ref).abs()
    assert fast_err.mean() <= 2 * sdpa_err.mean() and fast_err.max() <= 0.05


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_a_decode_step_computes_what_sdpa_computes_and_each_row_alone_what_it_computes_in_a_batch(mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Given one new token for each of 3 rows over a 9-position cache, grouped heads, rows 1 and 2 left-padded
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 1, 8, generator=g)
    k, v = torch.randn(3, 2, 9, 8, generator=g), torch.randn(3, 2, 9, 8, generator=g)
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    allowed = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    allowed[1, ..., :2] = allowed[2, ..., :5] = False
    mask = {"none": None, "bool": allowed,
            "float": torch.zeros(3, 1, 1, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    # When the step goes through the model's attention (one query per row: the decode path)
    out, _ = packed_sdpa_attention(module, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    # Then it is SDPA's result, in SDPA's layout [B, 1, heads, d]
    assert out.shape == ref.shape == (3, 1, 4, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and a row computed alone is bit for bit the row computed in the batch (batched greedy replies rely on it)
    for row in range(3):
        alone, _ = packed_sdpa_attention(module, q[row:row + 1], k[row:row + 1], v[row:row + 1],
                                         None if mask is None else mask[row:row + 1], scaling=0.3)
        assert torch.equal(alone[0], out[row])


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
