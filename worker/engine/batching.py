"""How many messages go into one forward pass, and how they share it: packed, not padded.

The messages of a pass are laid one after another in a single sequence behind the cached prompt prefix
(:func:`pack`). Each token sees the prefix and the earlier tokens of its own message only (a block-diagonal causal
mask), and its position is the one it has alone, so a packed score equals the unpacked one and no pass computes a
padding token. One sequence also means one pass where padded batches of uneven lengths needed several: every
pass through a quantised model dequantises each layer once (:mod:`worker.engine.quant`), so fewer passes is
directly less work. :func:`pack_batches` cuts a list of messages into passes by a token budget.
"""

from __future__ import annotations

import torch


def pack_batches(lengths: list[int], max_messages: int, max_tokens: int | None = None) -> list[list[int]]:
    """The positions of ``lengths`` grouped into passes of at most ``max_messages`` messages and ``max_tokens``
    tokens in all (a message longer than the budget goes alone), in their given order.

    Order is kept: with no padding, which messages share a pass changes no pass's cost, and passes of
    neighbouring messages let a caller stream results in order."""
    out: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i, n in enumerate(lengths):
        full = len(current) >= max_messages or (max_tokens is not None and tokens + n > max_tokens)
        if current and full:
            out.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        out.append(current)
    return out


def pack(seqs: list[list[int]], prefix_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists as one packed sequence behind a cached prefix of ``prefix_len`` tokens.

    Returns ``input_ids`` [1, T] (T the sum of the lengths), ``position_ids`` [1, T] (each message counts from
    ``prefix_len``, as it would alone), a boolean attention mask [1, 1, T, prefix_len + T] (True: may attend; every
    token sees the whole prefix and its own message up to itself) and ``last`` [n], the index of each message's
    last token in the sequence."""
    lengths = torch.tensor([len(s) for s in seqs])
    if (lengths == 0).any():
        raise ValueError("cannot pack an empty token list")
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long).unsqueeze(0)
    segment = torch.repeat_interleave(torch.arange(len(seqs)), lengths)  # [T]: which message each token is
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    position = torch.arange(len(segment)) - starts[segment] + prefix_len
    own = (segment[:, None] == segment[None, :]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    mask = torch.cat([torch.ones(len(segment), prefix_len, dtype=torch.bool), own], dim=1)
    return ids, position.unsqueeze(0), mask[None, None], ends - 1
