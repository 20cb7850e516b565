"""How many messages go into one forward pass, and how they are padded to share it.

Messages are sorted by token length so each batch pads little, cut into batches where lengths jump
(:func:`plan_batches`), and right-padded (:func:`right_pad`): right padding keeps every real token at the position
it has alone, so a batched score equals the unbatched one.
"""

from __future__ import annotations

import torch

# What one more forward pass costs beyond its tokens (cache copy, per-layer call overhead), in padded tokens.
BATCH_OVERHEAD_TOKENS = 32


def plan_batches(lengths: list[int], max_batch: int, overhead: int = BATCH_OVERHEAD_TOKENS,
                 max_tokens: int | None = None) -> list[tuple[int, int]]:
    """Cut a list of token lengths, sorted ascending, into batches of at most ``max_batch``: ``[(start, end)]``.
    ``max_tokens``: at most this many padded positions (``size x longest``) a batch, a lone message excepted: a
    batch's activations grow with its positions, so long messages go in smaller batches.

    A batch computes ``size x longest`` token positions (padding included). The cuts minimise the sum of that over
    the batches plus ``overhead`` per batch (dynamic programming, O(n x max_batch)): a batch whose lengths jump
    (a bulk task's 32 messages, sorted by bytes by the producer, can hold 40 tokens and 120) is split where they
    jump, and a run of similar lengths stays one full batch."""
    n = len(lengths)
    best = [0] * (n + 1)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j] = 2**62
        for i in range(max(0, j - max_batch), j):
            if max_tokens is not None and j - i > 1 and (j - i) * lengths[j - 1] > max_tokens:
                continue
            cost = best[i] + (j - i) * lengths[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def length_batches(lengths: list[int], max_batch: int, max_tokens: int | None = None) -> list[list[int]]:
    """The positions of ``lengths`` grouped into batches: sorted by length, cut by :func:`plan_batches`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    plan = plan_batches([lengths[i] for i in order], max_batch, max_tokens=max_tokens)
    return [order[start:end] for start, end in plan]


def right_pad(seqs: list[list[int]], pad_id: int, prefix_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one right-padded batch: ``input_ids`` [n, longest] and the attention mask
    [n, prefix_len + longest], where the first ``prefix_len`` positions are a cached prefix every row attends to."""
    n, longest = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, prefix_len + longest), dtype=torch.long)
    mask[:, :prefix_len] = 1
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, prefix_len : prefix_len + len(s)] = 1
    return ids, mask
