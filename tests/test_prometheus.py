"""Prometheus metrics: the worker's (served on ALLINONE_METRICS_PORT, counted in the store's transitions) and the
web app's, each exposing exactly the names docs/streaming.md documents."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from producer.web.metrics import WebMetrics
from worker import metrics
from worker.schemas import Sentiment
from worker.settings import Settings
from worker.store import Keys, MemoryStore
from worker.testing import PROJECT_ROOT, free_port

DOC = (PROJECT_ROOT / "docs" / "streaming.md").read_text()


def documented(component: str) -> set[str]:
    """The metric names docs/streaming.md lists for ``component`` (worker or web)."""
    section = DOC.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return {name for comp, name in re.findall(r"^\| (worker|web) \| `(\w+)`", section, flags=re.M) if comp == component}


def exposed(text: str) -> set[str]:
    families = set(re.findall(r"^# TYPE (\w+) \w+", text, flags=re.M))
    # prometheus-client names a counter's family without its _total suffix in TYPE lines
    return {f"{name}_total" if f"{name}_total" in text else name for name in families}


@pytest.mark.integration
def test_worker_metrics_count_what_the_store_wrote_and_are_served_on_their_port(redis_url):
    # Given a worker's store measured, with metrics served on a port
    port = free_port()
    settings = Settings(redis_url=redis_url, metrics_port=port, live_queue="live")
    store = metrics.start(settings, MemoryStore(), "tiny-model")
    assert isinstance(store, metrics.MeasuredStore)
    # When turns go through their transitions (one of them twice: a duplicate task)
    store.create_turn("c", "m1", "hello", queue="live")
    store.mark_enqueued("m1")
    store.mark_classified("m1", Sentiment(label="positive", confidence=0.9), "tiny-model")
    store.mark_done("m1", "hi", "tiny-model", timing={"new_tokens": 10, "seconds": 0.5, "prompt_tokens": 100,
                                                    "cached_prompt_tokens": 80})
    store.mark_done("m1", "hi again", "tiny-model")  # lost the race: not counted
    store.create_turn("c", "m2", "bad", queue="live")
    store.mark_failed("m2", "invalid message")
    # Then the scrape shows them, with queue depth and dead letters read from Redis
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'allinone_messages_total{queue="live",status="done"} 1.0' in text
    assert 'allinone_messages_total{queue="live",status="classified"} 1.0' in text
    assert 'allinone_messages_total{queue="live",status="failed"} 1.0' in text
    assert "allinone_reply_tokens_total 10.0" in text and "allinone_reply_tokens_per_second_sum 20.0" in text
    assert 'allinone_reply_prompt_tokens_total{source="cached"} 80.0' in text
    assert 'allinone_reply_prompt_tokens_total{source="computed"} 20.0' in text
    assert 'allinone_model_loaded{model="tiny-model"} 1.0' in text and "allinone_redis_up 1.0" in text
    assert 'allinone_queue_depth{queue="live"} 0.0' in text and "allinone_dead_letters 0.0" in text
    assert exposed(text) == documented("worker")


def test_worker_metrics_are_off_by_default_and_a_scrape_never_waits_on_a_redis_that_is_away():
    store = MemoryStore()
    assert metrics.start(Settings(), store, "m") is store  # no port: nothing served, the store as it is
    collector = metrics.RedisCollector(f"redis://127.0.0.1:{free_port()}/0", ["live"], Keys("allinone"))
    t0 = time.monotonic()
    families = {f.name: f for f in collector.collect()}
    assert time.monotonic() - t0 < 2.0
    assert families["allinone_redis_up"].samples[0].value == 0 and "allinone_queue_depth" not in families


def test_web_metrics_are_the_documented_names():
    m = WebMetrics()
    m.requests.labels("submit", "202").inc()
    m.request_seconds.labels("submit").observe(0.01)
    m.submit_seconds.observe(0.01)
    m.sse_events.labels("token").inc()
    assert exposed(m.render().decode()) == documented("web")
