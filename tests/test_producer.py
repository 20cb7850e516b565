"""The producer library on fakeredis (store) and Celery's in-memory broker (queue); its wait() on a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import fakeredis
import pytest
import redis
from celery import Celery

from producer.client import Producer
from worker.errors import (
    InvalidMessage,
    MessageIdConflict,
    StoreUnavailable,
    UnknownConversation,
    WaitTimeout,
)
from worker.schemas import Sentiment, Status
from worker.settings import Settings
from worker.store import RedisStore
from worker.testing import PROJECT_ROOT, free_port


@pytest.fixture()
def celery_memory():
    app = Celery("test-producer", broker="memory://")
    app.conf.task_serializer = "json"
    app.conf.accept_content = ["json"]
    return app


def queued(app: Celery, queue: str) -> list[dict]:
    """The task messages waiting on a queue (consumed from the in-memory broker)."""
    out = []
    with app.connection() as conn:
        q = conn.SimpleQueue(queue)
        while True:
            try:
                msg = q.get(block=False)
            except q.Empty:
                break
            out.append({"task": msg.headers["task"], "args": msg.payload[0], "kwargs": msg.payload[1],
                        "callbacks": msg.payload[2]["chain"]})
            msg.ack()
        q.close()
    return out


@pytest.fixture()
def producer(celery_memory):
    store = RedisStore(fakeredis.FakeRedis(decode_responses=True), prefix="t")
    return Producer(settings=Settings(max_message_chars=100), store=store, celery=celery_memory)


def test_submit_stores_a_queued_turn_and_sends_the_chain(producer, celery_memory):
    mid = producer.submit("conv-1", "The room was lovely")
    turn = producer.turn(mid)
    assert turn.status is Status.queued and turn.text == "The room was lovely" and turn.enqueued_at
    (msg,) = queued(celery_memory, "live")
    assert msg["task"] == "allinone.classify"
    assert msg["args"] == [{"message_id": mid, "conversation_id": "conv-1"}]
    # the reply is chained: the worker sends it when the sentiment task succeeds
    assert [c["task"] for c in msg["callbacks"]] == ["allinone.reply"]
    json.dumps(msg)  # plain JSON crosses the broker


def test_submit_with_own_id_is_idempotent(producer, celery_memory):
    assert producer.submit("c", "hello", message_id="m-1") == "m-1"
    assert producer.submit("c", "hello", message_id="m-1") == "m-1"
    assert len(producer.conversation("c").turns) == 1
    assert len(queued(celery_memory, "live")) == 1
    with pytest.raises(MessageIdConflict):
        producer.submit("c", "another text", message_id="m-1")


def test_bulk_queue_is_used_when_asked(producer, celery_memory):
    producer.submit("c", "hello", queue="bulk")
    assert queued(celery_memory, "live") == []
    assert [m["task"] for m in queued(celery_memory, "bulk")] == ["allinone.classify"]


@pytest.mark.parametrize(
    "conv,text,match",
    [("c", "", "empty"), ("c", "x" * 101, "limit is 100"), ("c", 12, "must be a string"),
     ("has space", "hi", "whitespace"), ("", "hi", "empty"), (None, "hi", "must be a string")],
)
def test_bad_input_is_refused_and_nothing_is_stored_or_sent(producer, celery_memory, conv, text, match):
    with pytest.raises(InvalidMessage, match=match):
        producer.submit(conv, text)
    assert producer.store.r.keys("*") == []
    assert queued(celery_memory, "live") == []


def test_conversation_in_submission_order_and_unknown_ids(producer):
    ids = [producer.submit("c", f"message {i}") for i in range(4)]
    assert [t.message_id for t in producer.conversation("c").turns] == ids
    with pytest.raises(UnknownConversation):
        producer.conversation("nope")


def test_wait_returns_the_finished_turn_or_times_out(producer):
    mid = producer.submit("c", "hello")
    with pytest.raises(WaitTimeout, match="still queued"):
        producer.wait(mid, timeout=0.2)
    producer.store.mark_classified(mid, Sentiment(label="positive", confidence=0.8), "m")
    producer.store.mark_done(mid, "Hi!", "m")
    turn = producer.wait(mid, timeout=1)
    assert turn.status is Status.done and turn.reply == "Hi!"


def test_redis_away_is_a_typed_error_not_a_success():
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_retry_seconds=0.3)
    p = Producer(settings=settings)
    with pytest.raises(StoreUnavailable):
        p.submit("c", "hello")


def test_producer_never_imports_torch():
    code = (
        "import sys, fakeredis\n"
        "from celery import Celery\n"
        "from producer import Producer\n"
        "from producer.__main__ import build_parser\n"
        "from worker.store import RedisStore\n"
        "p = Producer(store=RedisStore(fakeredis.FakeRedis(decode_responses=True)),"
        " celery=Celery('x', broker='memory://'))\n"
        "p.submit('c', 'hello')\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------- on a real Redis


class CountingRedis(redis.Redis):
    """A client that records the name of every command it sends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def execute_command(self, *args, **options):
        self.calls.append(str(args[0]))
        return super().execute_command(*args, **options)


@pytest.mark.integration
def test_wait_blocks_on_the_stream_instead_of_polling(redis_url):
    # Given a turn that a "worker" classifies after 1 s and finishes after 2 s
    writer = RedisStore.from_url(redis_url)
    writer.create_turn("c1", "m1", "hello")
    client = CountingRedis.from_url(redis_url, decode_responses=True)
    producer = Producer(settings=Settings(redis_url=redis_url), store=RedisStore(client))
    threading.Timer(1.0, writer.mark_classified, ("m1", Sentiment(label="positive", confidence=0.8), "m")).start()
    threading.Timer(2.0, writer.mark_done, ("m1", "the reply", "m")).start()
    # When a producer waits for it
    t0 = time.monotonic()
    turn = producer.wait("m1", timeout=30)
    # Then it returns the finished turn as soon as it is done, having asked Redis five times in two seconds: the
    # turn, one read per event (queued at once, then classified and done as they happened), the turn again.
    assert turn.status is Status.done and turn.reply == "the reply"
    assert 1.9 < time.monotonic() - t0 < 3.0
    assert client.calls == ["HGETALL", "XREAD", "XREAD", "XREAD", "HGETALL"]
