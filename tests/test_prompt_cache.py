"""The kept key/value caches of reply prompts (ALLINONE_PROMPT_CACHE_MB): unit tests, then on the tiny model."""

from __future__ import annotations

import pytest
import torch

from worker.engine import Engine
from worker.engine.prompt_cache import PromptCache, common_prefix
from worker.settings import Settings


def layers_for(ids: list[int], n_layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # keys/values whose numbers name their token, so a slice shows which tokens it holds
    t = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 2, -1, 4).contiguous()
    return [(t + i, -t - i) for i in range(n_layers)]


def entry_bytes(n: int) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers_for(list(range(n))))


def test_common_prefix_counts_the_shared_beginning():
    a = torch.tensor([1, 2, 3, 4])
    assert common_prefix(a, torch.tensor([1, 2, 9])) == 2
    assert common_prefix(a, torch.tensor([1, 2])) == 2
    assert common_prefix(a, a) == 4
    assert common_prefix(a, torch.tensor([7])) == 0
    assert common_prefix(a, torch.tensor([], dtype=torch.long)) == 0


def test_take_gives_the_longest_shared_beginning_of_any_entry():
    cache = PromptCache(1 << 20)
    cache.put(torch.tensor([1, 2, 3, 4, 5]), layers_for([1, 2, 3, 4, 5]))
    cache.put(torch.tensor([1, 2, 8, 9]), layers_for([1, 2, 8, 9]))
    layers, n = cache.take(torch.tensor([1, 2, 3, 4, 7, 7]))
    assert n == 4
    assert len(layers) == 2 and layers[0][0].shape == (1, 2, 4, 4)
    assert layers[0][0][0, 0, :, 0].tolist() == [1, 2, 3, 4] and layers[1][1][0, 0, :, 0].tolist() == [-2, -3, -4, -5]
    layers, n = cache.take(torch.tensor([1, 2, 8]))
    assert n == 3 and layers[0][0][0, 0, :, 0].tolist() == [1, 2, 8]
    assert cache.take(torch.tensor([6, 1, 2])) == (None, 0)


def test_a_new_entry_replaces_the_entries_it_extends():
    # Given a conversation's entry (prompt and reply) and another conversation's
    cache = PromptCache(1 << 20)
    first = list(range(100, 120))
    cache.put(torch.tensor(first), layers_for(first))
    other = [100, 101, *range(300, 318)]
    cache.put(torch.tensor(other), layers_for(other))
    # When the first conversation's next turn is kept (its tokens begin with all but the last 2 of the entry's)
    nxt = [*first[:-2], 7, 8, 9, *range(200, 220)]
    cache.put(torch.tensor(nxt), layers_for(nxt))
    # Then the earlier entry is gone, the other conversation's stays (it shares only two tokens)
    assert len(cache) == 2
    assert cache.take(torch.tensor(first))[1] == 18
    assert cache.take(torch.tensor(other))[1] == 20
    # and an entry that shares less than all but a few of an earlier one's tokens leaves it (a retried reply)
    retried = [*first[:10], 5, 5, 5, 5]
    cache.put(torch.tensor(retried), layers_for(retried))
    assert len(cache) == 3


def test_the_cache_keeps_at_most_its_bytes_least_recently_used_out_first():
    one = entry_bytes(4)
    cache = PromptCache(3 * one)
    for first in (10, 20, 30):
        cache.put(torch.tensor([first, 1, 2, 3]), layers_for([first, 1, 2, 3]))
    assert len(cache) == 3 and cache.nbytes == 3 * one
    cache.take(torch.tensor([10, 1]))  # used: now the most recent
    cache.put(torch.tensor([40, 1, 2, 3]), layers_for([40, 1, 2, 3]))
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.take(torch.tensor([20, 1, 2, 3]))[1] == 0  # the least recently used went
    assert cache.take(torch.tensor([10, 1, 2, 3]))[1] == 4
    # an entry larger than the whole budget is not kept; a smaller budget evicts at once; 0 keeps nothing
    cache.put(torch.tensor(list(range(50, 70))), layers_for(list(range(50, 70))))
    assert cache.take(torch.tensor([50]))[1] == 0
    cache.resize(one)
    assert len(cache) == 1 and cache.nbytes == one
    cache.resize(0)
    assert len(cache) == 0
    cache.put(torch.tensor([1, 2]), layers_for([1, 2]))
    assert len(cache) == 0


def test_a_row_of_a_batch_is_kept_as_its_own_copy():
    # Given keys and values of a batch of 4 rows, and the views of one row's tokens 2..6
    batch = torch.randn(4, 2, 10, 4)
    row = [(batch[1:2, :, 2:6], batch[1:2, :, 2:6] + 0)]
    cache = PromptCache(1 << 20)
    # When kept as a copy, Then the entry holds only its own bytes, not the batch's tensor
    cache.put(torch.tensor([5, 6, 7, 8]), row, copy=True)
    (k, _), = cache.take(torch.tensor([5, 6, 7, 8]))[0]
    assert torch.equal(k, batch[1:2, :, 2:6]) and k.untyped_storage().nbytes() == k.nbytes
    # while a single prompt's own tensors are kept as they are (no copy)
    own = torch.randn(1, 2, 4, 4)
    cache.put(torch.tensor([9, 9, 9, 9]), [(own, own)])
    kept = cache.take(torch.tensor([9, 9, 9, 9]))[0][0][0]
    assert kept.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------------------------- the tiny model
def engine_for(model_dir, tmp_path, **kw) -> Engine:
    s = dict(model=str(model_dir), dtype="float32", threads=1, do_sample=False, max_new_tokens=12, cache_dir=tmp_path)
    engine = Engine(Settings(**{**s, **kw}))
    engine.load()
    return engine


TURNS = ["hello there", "酒店位置很好，服务热情", "The plot is thin and the jokes fall flat.", "ok, and then?"]


def conversation(engine: Engine) -> list:
    history, replies = [], []
    for text in TURNS:
        r = engine.reply(history, text)
        replies.append(r)
        history.append((text, r.text))
    return replies


@pytest.mark.parametrize("mode", ["none", "int4"])
def test_a_conversations_next_turn_computes_only_its_new_tokens_and_replies_as_without_the_cache(
        lively_model_dir, tmp_path, mode):
    # Given the same conversation with the cache off and on (greedy, float32 activations)
    off = conversation(engine_for(lively_model_dir, tmp_path / "off", quantize=mode, prompt_cache_mb=0))
    engine = engine_for(lively_model_dir, tmp_path / "on", quantize=mode)
    on = conversation(engine)
    # Then with it off every prompt is computed whole
    assert all(r.cached_prompt_tokens == 0 for r in off)
    # and with it on each later turn reads the earlier prompt and most of its reply from the cache
    for before, r in zip(on, on[1:], strict=False):
        assert r.cached_prompt_tokens >= before.prompt_tokens
        assert r.cached_prompt_tokens < r.prompt_tokens
    # with the same replies: kept keys and values agree with recomputed ones to rounding, too little to move a
    # greedy choice of this model
    assert [r.text for r in on] == [r.text for r in off]
    assert len({r.text for r in on}) > 1
    # and any new prompt shares at least its system prompt with what is kept (this random model's replies do not
    # read back into the same tokens, so its entries are not superseded the way a trained model's are: unit tests)
    kept = engine.replier.prompt_cache
    assert 1 <= len(kept) <= len(TURNS)
    assert kept.take(engine.reply_prompt_ids([], "x")[0][0])[1] > 0


def test_batched_replies_read_and_fill_the_cache_and_equal_single_ones(lively_model_dir, tmp_path):
    engine = engine_for(lively_model_dir, tmp_path)
    history = [(TURNS[0], "hi"), (TURNS[1], "好的")]
    items = [(history, "and then?"), ([], TURNS[2]), (history[:1], TURNS[3])]
    # Given the replies one at a time, each from a cold cache
    single = []
    for h, t in items:
        engine.replier.prompt_cache.clear()
        single.append(engine.reply(h, t))
    assert all(r.cached_prompt_tokens == 0 for r in single)
    # When the batch runs on a cold cache, Then each row is its single reply
    engine.replier.prompt_cache.clear()
    batch = engine.reply_batch(items)
    assert [r.text for r in batch] == [r.text for r in single]
    # and each row was kept: the same batch again computes only each prompt's last token
    again = engine.reply_batch(items)
    assert [r.cached_prompt_tokens for r in again] == [r.prompt_tokens - 1 for r in again]
    assert [r.text for r in again] == [r.text for r in single]


def test_the_cache_stays_within_its_budget(lively_model_dir, tmp_path):
    engine = engine_for(lively_model_dir, tmp_path, prompt_cache_mb=1)
    replies = conversation(engine)
    kept = engine.replier.prompt_cache
    assert kept.max_bytes == 1 << 20 and 0 < kept.nbytes <= kept.max_bytes
    # a budget too small for one conversation's entry keeps nothing, and replies still come
    engine.settings = engine.settings.model_copy(update={"prompt_cache_mb": 0})
    assert engine.reply([], TURNS[0]).text == replies[0].text
    assert len(kept) == 0
