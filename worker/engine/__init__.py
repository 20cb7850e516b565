"""The engine: the one model of a worker process, and the two jobs it does (sentiment, replies).

What lives where:

- ``engine.py``: :class:`Engine`, the facade: ``Engine(settings)`` is cheap; ``load()`` runs once (threads ->
  weights -> CPU tuning -> sentiment adapter -> sentiment prefix -> head, logged before and after); then
  ``classify``/``score`` and ``reply``.
- ``loading.py``: weights and tokenizer from a hub id, a folder or a GGUF (converted once into
  ``ALLINONE_CACHE_DIR``); the load dtype rule; :class:`LoadReport`.
- ``identity.py``: :class:`ModelIdentity`, the loaded model's name and a fingerprint of its weights that is the
  same wherever and however they were stored.
- ``cpu.py``: threads, weight-only quantisation at load, bf16 Linears packed for oneDNN (and their file pages
  released).
- ``quant.py``: weight-only int8 (per output channel) and int4 (groups of 32) linear layers on torch's own CPU
  kernels (``ALLINONE_QUANTIZE``), the LM head included.
- ``gguf.py``: a GGUF loaded tensor by tensor straight into quantised layers (no float copy of the whole model),
  and cached in that form.
- ``batching.py``: which messages share a forward pass (:func:`pack_batches`), packed into one sequence.
- ``sentiment.py``: the sentiment pipeline (preprocess -> forward -> postprocess) on a cached prompt prefix;
  :class:`Scores`.
- ``head.py``: the optional trained sentiment head, and the checks that it belongs to the loaded model and prompt.
- ``adapter.py``: the optional sentiment adapter (LoRA on the decoder layers' projections), put into the model only for
  sentiment forward passes, and the checks that it fits the loaded model.
- ``reply.py``: chat replies: history that fits, the prompt, the decode (``Replier.generate``), :class:`Reply`.

A sentiment call, ``engine.classify(texts)``: each text becomes its own tokens plus the prompt's suffix (the
instruction and few-shot turns before it ran once at load and their key/value cache is kept); texts are packed
one after another into passes of a token budget (preprocess); the decoder runs each pass on a copy of the prefix cache
and we keep the final hidden state at each message's last token, plus any inner layers a head reads (forward); two
rows of the LM head turn it into the two label logits, and the head (if loaded) or the softmax of those logits into
a :class:`~worker.schemas.Sentiment` (postprocess). Right padding keeps every real token at its unbatched position,
so batched, cached and plain scores agree.

A reply, ``engine.reply(history, text)``: the most recent earlier turns that fit the history token budget, with
special-token strings in user text broken up (:func:`worker.prompts.neutralize`), are rendered with the model's chat
template; ``generate`` decodes new tokens up to ``max_new_tokens``, a stop token or the wall-clock bound; the
result is a :class:`Reply`. ``engine.reply_batch(items)`` decodes several replies together (left-padded prompts,
a row ends at its stop token, the time bound holds for the batch): the bulk path's replies.
"""

from __future__ import annotations

from worker.engine.adapter import SentimentAdapter
from worker.engine.batching import pack, pack_batches
from worker.engine.cpu import PackedLinear, pack_bf16_linears
from worker.engine.engine import Engine
from worker.engine.identity import ModelIdentity
from worker.engine.loading import LoadReport, converted_cache_path, gguf_cache_dir, load_dtype
from worker.engine.quant import packed_kernels_only
from worker.engine.reply import Reply
from worker.engine.sentiment import Scores

__all__ = [
    "Engine",
    "LoadReport",
    "ModelIdentity",
    "PackedLinear",
    "Reply",
    "Scores",
    "SentimentAdapter",
    "converted_cache_path",
    "gguf_cache_dir",
    "load_dtype",
    "pack",
    "pack_batches",
    "pack_bf16_linears",
    "packed_kernels_only",
]
