"""Which messages share a forward pass, and how they are padded."""

from __future__ import annotations

import torch

from worker.engine import plan_batches
from worker.engine.batching import length_batches, right_pad


def test_batches_are_cut_where_lengths_jump_and_never_exceed_the_batch_size():
    # equal lengths: as few batches as the size allows
    assert sorted(b - a for a, b in plan_batches([10] * 5, 4, overhead=32)) == [1, 4]
    # a jump: 4 short and 4 long messages are two batches (4*10 + 4*100 + 2*32 < 8*100 + 32)
    assert plan_batches([10, 10, 11, 12, 100, 100, 101, 101], 8, overhead=32) == [(0, 4), (4, 8)]
    # a small jump is not worth another forward pass (8*13 + 32 < 4*10 + 4*13 + 2*32)
    assert plan_batches([10, 10, 10, 10, 13, 13, 13, 13], 8, overhead=32) == [(0, 8)]
    assert plan_batches([], 8) == [] and plan_batches([5], 8) == [(0, 1)]
    # every message in exactly one batch, in order, none over the size
    lengths = sorted((i * 37) % 120 + 5 for i in range(200))
    plan = plan_batches(lengths, 16)
    assert [a for a, _ in plan] == [0] + [b for _, b in plan][:-1] and plan[-1][1] == 200
    assert all(0 < b - a <= 16 for a, b in plan)


def test_a_token_budget_bounds_each_batch_but_never_refuses_a_long_message():
    lengths = sorted((i * 37) % 120 + 5 for i in range(200)) + [900, 2000]
    plan = plan_batches(lengths, 16, max_tokens=256)
    # every message in exactly one batch; a batch of several holds at most 256 padded positions
    assert [a for a, _ in plan] == [0] + [b for _, b in plan][:-1] and plan[-1][1] == len(lengths)
    assert all(b - a == 1 or (b - a) * lengths[b - 1] <= 256 for a, b in plan)
    # short messages still fill whole batches; the messages over the budget go alone
    assert plan[0][1] > 8 and plan[-2:] == [(200, 201), (201, 202)]
    # equal long messages share one batch without a budget and go one by one under a budget below two of them
    assert plan_batches([300] * 4, 16) == [(0, 4)]
    assert plan_batches([300] * 4, 16, max_tokens=512) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_length_batches_group_unsorted_positions_by_length():
    # Given unsorted lengths: four short, four long
    lengths = [100, 10, 101, 11, 100, 12, 101, 10]
    # Then the batches hold positions, shortest first, split at the jump
    assert length_batches(lengths, 8) == [[1, 7, 3, 5], [0, 4, 2, 6]]


def test_right_padding_keeps_tokens_at_their_unbatched_positions():
    ids, mask = right_pad([[5, 6, 7], [8]], pad_id=0, prefix_len=2)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    # the prefix is attended by every row, then each row's own tokens, never the padding
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
