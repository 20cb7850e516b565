"""The engine: the one model of a worker process, its lifecycle, and the two jobs it does.

``Engine(settings)`` is cheap. ``load()`` runs once: threads -> weights (and their identity) -> CPU tuning ->
sentiment adapter -> sentiment prefix (computed with the adapter on) -> head, logged before and after. Then
``classify``/``score`` (:mod:`worker.engine.sentiment`) and ``reply`` (:mod:`worker.engine.reply`) as often as
needed; this class only holds the pieces and hands each call the settings it runs under.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from worker import prompts
from worker.engine import compiled_decode, cpu, loading, quant
from worker.engine.adapter import SentimentAdapter
from worker.engine.attention import use_packed_attention
from worker.engine.head import SentimentHead
from worker.engine.identity import ModelIdentity, identify
from worker.engine.loading import LoadReport
from worker.engine.reply import Replier, Reply
from worker.engine.sentiment import Scores, SentimentPipeline
from worker.errors import AdapterError, HeadError
from worker.schemas import Sentiment
from worker.settings import Settings

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def gives_back_memory(method: F) -> F:
    """After the call, the freed activation memory goes back to the system (:func:`cpu.give_back_freed_memory`):
    within a call the layers reuse each other's buffers from the heap, between calls the worker holds the model."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            cpu.give_back_freed_memory()

    return cast(F, wrapper)


class Engine:
    """Owns the tokenizer and the model. Not thread-safe: one worker process, one task at a time."""

    def __init__(self, settings: Settings, few_shot: tuple[tuple[str, str], ...] | None = None) -> None:
        self.settings = settings
        self.few_shot = prompts.FEW_SHOT if few_shot is None else few_shot
        self.tokenizer: Any = None
        self.model: Any = None
        self.report: LoadReport | None = None
        self.head: SentimentHead | None = None
        self.adapter: SentimentAdapter | None = None
        self._sentiment: SentimentPipeline | None = None
        self._replier: Replier | None = None
        self._identity: ModelIdentity | None = None

    # ------------------------------------------------------------------------------------------- lifecycle
    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def model_id(self) -> str:
        return self.settings.model

    def load(self) -> LoadReport:
        """Load tokenizer and weights once, then prepare the sentiment prefix and the head. Logs before and after."""
        if self.report is not None:
            return self.report
        s = self.settings
        dtype = loading.load_dtype(s)
        cpu.set_threads(s.threads)
        cpu.huge_pages()
        cpu.reuse_freed_memory()
        log.info("loading model %s (dtype %s, %d threads, quantize %s)", s.model, dtype, s.threads,
                 s.resolved_quantize())
        t0 = time.perf_counter()
        loaded = loading.load_weights(s, dtype)
        self.tokenizer = loaded.tokenizer
        self._identity = identify(s.model, loaded.model, loaded.fingerprint)
        self.model = cpu.tune(loaded.model, s, dtype, keep_rows=prompts.label_token_ids(self.tokenizer))
        loaded.model = None
        use_packed_attention(self.model)
        if s.sentiment_adapter is not None:
            self.adapter = self._load_adapter(s.sentiment_adapter)
        self._sentiment = SentimentPipeline(self.tokenizer, self.model, self.few_shot, self.adapter)
        self._replier = Replier(self.tokenizer, self.model)
        if s.sentiment_head is not None:
            self.head = self._load_head(s.sentiment_head)
        if s.compile_decode and compiled_decode.compile_decode(self.model):
            compiled_decode.warm_up(self.model, self._decode_a_little)
        cpu.give_back_freed_memory()  # the conversion's and the warm-up's temporaries, before the RSS is read
        self.report = LoadReport(
            model=s.model,
            source=loaded.source,
            dtype=str(next(self.model.parameters()).dtype).replace("torch.", ""),
            threads=torch.get_num_threads(),
            seconds=round(time.perf_counter() - t0, 3),
            rss_bytes=loading.rss_bytes(),
            weights_bytes=loading.weights_bytes(self.model),
            from_cache=loaded.from_cache,
            prefix_tokens=len(self._sentiment.prefix_ids),
            quantize=s.resolved_quantize(),
            identity=self._identity,
            compiled_decode=compiled_decode.is_compiled(self.model),
            dequant_rows=quant.DEQUANT_ROWS if quant.quantized_layers(self.model) else None,
        )
        r = self.report
        log.info(
            "model loaded: %s from %s in %.1f s (%s, %d threads, RSS %.0f MiB, weights %.0f MiB, %s); identity %s",
            s.model,
            r.source,
            r.seconds,
            r.dtype,
            r.threads,
            r.rss_bytes / 2**20,
            r.weights_bytes / 2**20,
            "converted-weights cache" if r.from_cache else "no cache",
            r.identity,
        )
        return r

    def _decode_a_little(self) -> None:
        """A few greedy tokens of one reply, then of two prompts of different lengths decoded together: every
        shape of decode step the worker runs (one row; several rows, left-padded)."""
        assert self._replier is not None
        s = self.settings.model_copy(update={"max_new_tokens": 3, "do_sample": False})
        ids, _ = self._replier.prompt_ids([], "hello", s)
        self._replier.generate(ids, s)
        self._replier.generate_batch([ids, ids[:, 1:]], s)

    def _load_adapter(self, path: str | Path) -> SentimentAdapter:
        # Held in the activations' dtype: the form the forward pass uses, once (not float32 beside a bf16 copy).
        adapter = SentimentAdapter.load(path, dtype=getattr(torch, loading.load_dtype(self.settings)))
        try:
            adapter.check_model(identity=self.identity, prompt=prompts.prompt_fingerprint(self.few_shot))
            adapter.attach(self.model)
        except AdapterError as e:
            raise AdapterError(f"{path}: {e}") from e
        log.info("sentiment adapter %s: rank %d, %d projections, %.1f MiB", path, adapter.rank, len(adapter.names),
                 adapter.nbytes / 2**20)
        return adapter

    def use_adapter(self, adapter: SentimentAdapter | str | Path | None) -> None:
        """Score sentiment with ``adapter`` (an adapter, or its file, checked like the setting's) from now on, or
        without one (None); the cached prefix is recomputed, and a loaded head trained on other states is dropped.
        What training an adapter and comparing with and without one use."""
        self._require_loaded()
        if isinstance(adapter, (str, Path)):
            adapter = self._load_adapter(adapter)
        elif adapter is not None:
            adapter.attach(self.model)
        self.adapter = adapter
        self.sentiment.use_adapter(adapter)
        fp = adapter.fingerprint if adapter is not None else None
        if self.head is not None and self.head.meta.get("adapter") != fp:
            log.info("sentiment head dropped: it was trained on the states of another adapter (or none)")
            self.head = None

    def use_head(self, path: str | Path | None) -> None:
        """Read sentiment through the head in ``path`` (checked against the model, prompt and adapter in use), or
        through none."""
        self._require_loaded()
        self.head = self._load_head(path) if path is not None else None

    def _load_head(self, path: str | Path) -> SentimentHead:
        head = SentimentHead.load(path)
        try:
            head.check_model(
                identity=self.identity,
                prompt=prompts.prompt_fingerprint(self.few_shot),
                hidden_size=self.hidden_size,
                num_layers=self.num_layers,
                adapter=self.adapter.fingerprint if self.adapter is not None else None,
            )
        except HeadError as e:
            raise HeadError(f"{path}: {e}") from e
        return head

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError("Engine.load() must run before classify() or reply()")

    @property
    def identity(self) -> ModelIdentity:
        """The loaded model's name and weights fingerprint (what a sentiment head is checked against)."""
        self._require_loaded()
        assert self._identity is not None
        return self._identity

    @property
    def sentiment(self) -> SentimentPipeline:
        """The sentiment pipeline (preprocess -> forward -> postprocess) on this model's cached prefix."""
        self._require_loaded()
        assert self._sentiment is not None
        return self._sentiment

    @property
    def replier(self) -> Replier:
        """What writes replies with this model."""
        self._require_loaded()
        assert self._replier is not None
        return self._replier

    @property
    def num_layers(self) -> int:
        return self.sentiment.num_layers

    @property
    def hidden_size(self) -> int:
        return self.sentiment.hidden_size

    # ------------------------------------------------------------------------------------------- sentiment
    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The inner layers whose states the loaded head reads (none without a head)."""
        return self.head.layers if self.head is not None else ()

    def message_ids(self, text: str) -> list[int]:
        """A message's own tokens in the sentiment prompt: its text (cut to the token budget) and the suffix."""
        return self.sentiment.message_ids(text, self.settings.sentiment_max_tokens)

    @gives_back_memory
    def score(self, texts: list[str], batch_size: int | None = None, layers: tuple[int, ...] | None = None) -> Scores:
        """Label logits and hidden states of many messages, batched, on the cached prefix.

        ``layers``: inner layers to return the last-token state of (default: those the loaded head reads)."""
        sentiment = self.sentiment
        assert self.report is not None  # loaded, as self.sentiment checked
        return sentiment.score(
            texts,
            batch_size=batch_size or self.settings.sentiment_batch_size,
            max_tokens=self.settings.sentiment_max_tokens,
            layers=self.feature_layers if layers is None else tuple(layers),
            batch_tokens=self.settings.resolved_batch_tokens(self.report.dtype),
        )

    @gives_back_memory
    def score_plain(self, text: str) -> Scores:
        """The reference: the whole prompt in one ordinary forward pass (tests and the benchmark compare)."""
        return self.sentiment.score_plain(text, self.settings.sentiment_max_tokens)

    def classify(self, texts: list[str], batch_size: int | None = None) -> list[Sentiment]:
        """Positive or negative, with a confidence, for each text (batched on the cached prefix)."""
        if not texts:
            return []
        return self.sentiments(self.score(texts, batch_size=batch_size))

    def prompt_p_positive(self, scores: Scores) -> torch.Tensor:
        """P(positive) from the two label logits alone (the prompt, without a head)."""
        return scores.p_positive

    def sentiments(self, scores: Scores) -> list[Sentiment]:
        """Labels and confidences from scores: the head's probability when one is loaded, else the prompt's."""
        return self.sentiment.sentiments(scores, self.head)

    # ------------------------------------------------------------------------------------------- replies
    def count_tokens(self, text: str) -> int:
        return self.replier.count_tokens(text)

    def fit_history(self, history: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The most recent earlier turns whose tokens fit the history budget, oldest first."""
        return self.replier.fit_history(history, self.settings.history_tokens)

    def reply_prompt_ids(self, history: list[tuple[str, str]], text: str) -> tuple[torch.Tensor, int]:
        """The reply prompt's token ids [1, T] and how many earlier turns it holds."""
        return self.replier.prompt_ids(history, text, self.settings)

    @gives_back_memory
    def reply(
        self, history: list[tuple[str, str]], text: str, on_text: Callable[[str], None] | None = None
    ) -> Reply:
        """A chat reply to ``text`` that sees the earlier (user, reply) turns that fit the history budget;
        ``on_text`` gets its text as it is written (the pieces of a streamed reply)."""
        return self.replier.reply(history, text, self.settings, on_text=on_text)

    @gives_back_memory
    def reply_batch(self, items: list[tuple[list[tuple[str, str]], str]]) -> list[Reply]:
        """Replies to several (earlier turns, text) pairs decoded together in one batch (the bulk path); under
        greedy decoding each equals its own :meth:`reply`."""
        return self.replier.reply_batch(items, self.settings)
