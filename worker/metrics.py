"""The worker's Prometheus metrics: off unless ``ALLINONE_METRICS_PORT`` is set (then prometheus-client, the
``metrics`` extra, serves ``/metrics`` on that port from its own thread). Names and meanings: docs/streaming.md,
"Metrics".

What a turn went through is counted where it happens, in the store's status transitions (:class:`MeasuredStore`
wraps the worker's store: only a transition this worker actually wrote counts, so a redelivered task is not counted
twice); what Redis holds (queue depth, dead letters) is read when Prometheus scrapes, with a short time-out, so
a scrape never waits on a Redis that is away.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import redis

from worker.settings import Settings
from worker.store import ResultsStore
from worker.store.keys import Keys

log = logging.getLogger(__name__)

# From a cached sentiment (tens of milliseconds) to a reply that waited behind a bulk backlog (minutes).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
TOKENS_PER_SECOND_BUCKETS = (1, 2, 4, 6, 8, 10, 15, 20, 30, 50, 100, 200, 500)
_SCRAPE_TIMEOUT = 0.5


class WorkerMetrics:
    """The worker's metrics in their own registry."""

    def __init__(self, model: str, queues: list[str], redis_url: str, keys: Keys) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # a `_created` timestamp per series is noise here (and doubles the output)
        self.registry = r = CollectorRegistry()
        self.messages = Counter(
            "allinone_messages", "Turns that reached a status (classified, done, failed), by queue.",
            ["queue", "status"], registry=r,
        )
        self.sentiment_seconds = Histogram(
            "allinone_sentiment_seconds", "From enqueued to classified (queue wait included), by queue.", ["queue"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.reply_seconds = Histogram(
            "allinone_reply_seconds", "From classified to done (the reply, and any wait for earlier turns).",
            ["queue"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "allinone_end_to_end_seconds", "From enqueued to done or failed, by queue.", ["queue"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter("allinone_reply_tokens", "Reply tokens decoded.", registry=r)
        self.tokens_per_second = Histogram(
            "allinone_reply_tokens_per_second", "Decode speed of each reply (its tokens over its decode time).",
            buckets=TOKENS_PER_SECOND_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "allinone_reply_prompt_tokens", "Reply prompt tokens, by where their keys and values came from: computed, "
            "or cached (kept from the conversation's earlier turn, ALLINONE_PROMPT_CACHE_MB).", ["source"], registry=r,
        )
        self.model_loaded = Gauge(
            "allinone_model_loaded", "1 once this worker has its model loaded.", ["model"], registry=r
        )
        self.model_loaded.labels(model).set(1)
        r.register(RedisCollector(redis_url, queues, keys))

    def classified(self, turn: Any) -> None:
        queue = turn.queue or ""
        self.messages.labels(queue, "classified").inc()
        if turn.classified_at is not None:
            self.sentiment_seconds.labels(queue).observe(turn.classified_at - _since(turn))

    def finished(self, turn: Any, timing: dict[str, Any] | None = None) -> None:
        queue = turn.queue or ""
        self.messages.labels(queue, turn.status.value).inc()
        if turn.done_at is not None:
            self.end_to_end_seconds.labels(queue).observe(turn.done_at - _since(turn))
            if turn.classified_at is not None and turn.status.value == "done":
                self.reply_seconds.labels(queue).observe(turn.done_at - turn.classified_at)
        if timing and timing.get("new_tokens") and timing.get("seconds"):
            self.tokens.inc(timing["new_tokens"])
            self.tokens_per_second.observe(timing["new_tokens"] / timing["seconds"])
        if timing and timing.get("prompt_tokens"):
            cached = int(timing.get("cached_prompt_tokens") or 0)
            self.prompt_tokens.labels("cached").inc(cached)
            self.prompt_tokens.labels("computed").inc(int(timing["prompt_tokens"]) - cached)


def _since(turn: Any) -> float:
    # enqueued_at is written by the producer right after the publish: a fast worker may finish first.
    return float(turn.enqueued_at if turn.enqueued_at is not None else turn.created_at)


class RedisCollector:
    """Queue depth and dead letters, read from Redis at scrape time (three LLENs, one round trip)."""

    def __init__(self, redis_url: str, queues: list[str], keys: Keys) -> None:
        self.client = redis.Redis.from_url(
            redis_url, socket_timeout=_SCRAPE_TIMEOUT, socket_connect_timeout=_SCRAPE_TIMEOUT, retry_on_timeout=False
        )
        self.queues = queues
        self.keys = keys

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("allinone_redis_up", "1 when Redis answered this scrape.")
        try:
            pipe = self.client.pipeline(transaction=False)
            for q in self.queues:
                pipe.llen(q)
            pipe.llen(self.keys.deadletter())
            *depths, dead = pipe.execute()
        except redis.exceptions.RedisError as e:
            log.debug("metrics: Redis did not answer the scrape: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("allinone_queue_depth", "Messages waiting on a queue.", labels=["queue"])
        for q, n in zip(self.queues, depths, strict=True):
            depth.add_metric([q], n)
        yield depth
        yield GaugeMetricFamily("allinone_dead_letters", "Task messages in the dead-letter list.", value=dead)


class MeasuredStore:
    """The worker's store, counting each status transition this worker wrote (everything else passes through)."""

    def __init__(self, store: ResultsStore, metrics: WorkerMetrics) -> None:
        self._store = store
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def _observe(self, message_id: str, observe: Any, *args: Any) -> None:
        try:
            observe(self._store.get_turn(message_id), *args)
        except Exception as e:  # a metric must never fail a task
            log.debug("metrics: %s not counted: %s", message_id, e)

    def mark_classified(self, message_id: str, sentiment: Any, model: str) -> bool:
        written = self._store.mark_classified(message_id, sentiment, model)
        if written:
            self._observe(message_id, self.metrics.classified)
        return written

    def mark_done(
        self,
        message_id: str,
        reply: str,
        model: str,
        error: str | None = None,
        context: list[str] | None = None,
        timing: dict[str, float] | None = None,
    ) -> bool:
        written = self._store.mark_done(message_id, reply, model, error=error, context=context, timing=timing)
        if written:
            self._observe(message_id, self.metrics.finished, timing)
        return written

    def mark_failed(self, message_id: str, reason: str) -> bool:
        written = self._store.mark_failed(message_id, reason)
        if written:
            self._observe(message_id, self.metrics.finished)
        return written


def start(settings: Settings, store: ResultsStore, model: str) -> ResultsStore:
    """Serve the metrics on ``ALLINONE_METRICS_PORT`` and return the store to use (measured); without the port,
    the store as it is. Without prometheus-client the worker runs on, unmeasured, and says why."""
    if not settings.metrics_port:
        return store
    try:
        from prometheus_client import start_http_server
    except ImportError:
        log.error("ALLINONE_METRICS_PORT is set but prometheus-client is not installed (pip install "
                  "'allinone-worker[metrics]'): no metrics")
        return store
    metrics = WorkerMetrics(
        model, [settings.live_queue, settings.bulk_queue], settings.redis_url, Keys(settings.key_prefix)
    )
    start_http_server(settings.metrics_port, registry=metrics.registry)
    log.info("metrics on :%d/metrics", settings.metrics_port)
    return MeasuredStore(store, metrics)  # type: ignore[return-value]
