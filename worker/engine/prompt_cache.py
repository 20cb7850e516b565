"""Keys and values of recent reply prompts, kept so that a conversation's next turn computes only its new tokens.

A reply's prompt is the conversation so far: the earlier turns that fit ``ALLINONE_HISTORY_TOKENS`` and the new
message. Turn n + 1's prompt begins with turn n's prompt and reply, so computing it from scratch reads the whole
conversation again before the first new token: in a ten-turn conversation ~1,000 tokens, 3.2 s on two cores with
the stand-in model (``docs/benchmark.md``). This keeps, per worker process, the key/value cache of each recent
reply (its prompt and the reply's tokens), and a new prompt starts from the kept entry that shares its longest
beginning, token for token (as llama.cpp's server and vLLM's prefix caching do): only the tokens after it run.

Entries are found by their tokens, not by a conversation id, so every caller benefits, and the system prompt that
every conversation begins with is served by any entry. A conversation keeps one entry, its latest: a new entry
replaces those it extends (all their tokens but the last few, where a reply's own tokens and the tokens of its
text read back into the next prompt can differ). Bounded in bytes (``ALLINONE_PROMPT_CACHE_MB``), the
least recently used out first. Each worker process has its own: with several workers a conversation's turns may
land on different ones, and a miss costs only the recomputation.

An entry's tensors are never written to: a cache built on them (``DynamicLayer.update``) concatenates into new
tensors, so handing out views is safe.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

MIB = 1 << 20
# How many tokens at an entry's end its successor may differ in and still replace it: a reply's tokens as decoded
# and as its text tokenises again in the next prompt differ at most at its very end (stripped spaces, the stop).
REREAD_TOKENS = 8

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer, keys and values [1, kv_heads, tokens, d]


@dataclass
class Entry:
    ids: torch.Tensor  # [tokens] the tokens whose keys and values are kept
    layers: Layers

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tokens two 1-D id tensors share from their start."""
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


class PromptCache:
    """Kept key/value caches of reply prompts, at most ``max_bytes`` of tensors, least recently used out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict()

    def take(self, ids: torch.Tensor) -> tuple[Layers | None, int]:
        """The kept keys and values of the longest beginning of ``ids`` [tokens] that an entry holds (views, no
        copy), and its length; ``(None, 0)`` when no entry shares a first token."""
        best, best_key = 0, None
        for key, entry in self._entries.items():
            n = common_prefix(entry.ids, ids)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return None, 0
        self._entries.move_to_end(best_key)
        layers = self._entries[best_key].layers
        return [(k[:, :, :best], v[:, :, :best]) for k, v in layers], best

    def put(self, ids: torch.Tensor, layers: Layers, copy: bool = False) -> None:
        """Keep the keys and values of ``ids``: the tensors as they are, or, with ``copy``, copies made once the
        entry is known to fit (a batch's rows: a view would keep the whole batch's tensors alive)."""
        entry = Entry(ids=ids.detach().clone(), layers=layers)
        if self.max_bytes <= 0 or entry.nbytes > self.max_bytes or ids.numel() == 0:
            return
        if copy:
            entry.layers = [(k.clone(), v.clone()) for k, v in layers]
        for key, e in list(self._entries.items()):
            shared = common_prefix(e.ids, entry.ids)
            if shared >= e.ids.numel() - REREAD_TOKENS and 2 * shared > e.ids.numel():
                del self._entries[key]  # superseded: this conversation's earlier entry
        self._entries[self._next] = entry
        self._next += 1
        self._evict()

    def clear(self) -> None:
        self._entries.clear()

    def _evict(self) -> None:
        total = self.nbytes
        while self._entries and total > self.max_bytes:
            _, entry = self._entries.popitem(last=False)
            total -= entry.nbytes


def row_layers(cache: Any, row: int, start: int, end: int) -> Layers:
    """Keys and values of tokens ``start:end`` of one row of a transformers cache, per layer (views)."""
    return [(layer.keys[row : row + 1, :, start:end], layer.values[row : row + 1, :, start:end])
            for layer in cache.layers]


def stack_left_padded(caches: list[Any], width: int) -> Layers:
    """The caches of single prompts (one row each) as one batch's, each row right-aligned in ``width`` positions
    (left padding, which the batch's attention mask hides), per layer."""
    ref = next(c for c in caches if c.get_seq_length()).layers  # a row with tokens: its shapes
    out = []
    for i, layer in enumerate(ref):
        k0, v0 = layer.keys, layer.values
        k = k0.new_zeros(len(caches), k0.shape[1], width, k0.shape[3])
        v = v0.new_zeros(len(caches), v0.shape[1], width, v0.shape[3])
        for row, cache in enumerate(caches):
            n = cache.get_seq_length()
            if n:
                k[row, :, width - n :] = cache.layers[i].keys[0]
                v[row, :, width - n :] = cache.layers[i].values[0]
        out.append((k, v))
    return out
