"""Which messages share a forward pass, and how they are packed into one sequence."""

from __future__ import annotations

import itertools

import pytest
import torch

from worker.engine import pack, pack_batches


def test_passes_keep_order_and_respect_the_message_and_token_bounds():
    lengths = [(i * 37) % 120 + 5 for i in range(200)]
    plan = pack_batches(lengths, 16, max_tokens=256)
    # every message in exactly one pass, in the given order
    assert [i for rows in plan for i in rows] == list(range(200))
    # none over 16 messages, none of several messages over 256 tokens
    assert all(0 < len(rows) <= 16 for rows in plan)
    assert all(len(rows) == 1 or sum(lengths[i] for i in rows) <= 256 for rows in plan)
    # greedy: a pass is only cut when the next message would not fit
    for rows, nxt in itertools.pairwise(plan):
        assert len(rows) == 16 or sum(lengths[i] for i in rows) + lengths[nxt[0]] > 256


def test_a_message_over_the_budget_goes_alone_and_no_budget_means_the_message_bound_only():
    assert pack_batches([10, 900, 10, 10], 8, max_tokens=64) == [[0], [1], [2, 3]]
    assert pack_batches([300] * 5, 2) == [[0, 1], [2, 3], [4]]
    assert pack_batches([], 8) == [] and pack_batches([5], 8) == [[0]]


def test_packing_keeps_each_token_at_its_own_position_seeing_the_prefix_and_its_own_message():
    ids, positions, mask, last = pack([[5, 6, 7], [8], [9, 4]], prefix_len=2)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 4]]
    # each message counts its positions from the end of the prefix, as it would alone
    assert positions.tolist() == [[2, 3, 4, 2, 2, 3]]
    assert last.tolist() == [2, 3, 5]
    assert mask.shape == (1, 1, 6, 8) and mask.dtype == torch.bool
    expected = [
        # prefix  message 0   message 1  message 2
        [1, 1,    1, 0, 0,    0,         0, 0],
        [1, 1,    1, 1, 0,    0,         0, 0],
        [1, 1,    1, 1, 1,    0,         0, 0],
        [1, 1,    0, 0, 0,    1,         0, 0],
        [1, 1,    0, 0, 0,    0,         1, 0],
        [1, 1,    0, 0, 0,    0,         1, 1],
    ]
    assert mask[0, 0].int().tolist() == expected


def test_an_empty_token_list_cannot_be_packed():
    with pytest.raises(ValueError, match="empty"):
        pack([[1], []])
