"""Sending a turn's work: task names and payloads as the worker expects them."""

from __future__ import annotations

import json

import pytest
import redis
from celery import Celery
from test_producer import queued

from producer.client import make_celery
from worker import contract
from worker.contract import send_turn
from worker.settings import Settings


@pytest.fixture()
def app():
    a = Celery("test-contract", broker="memory://")
    a.conf.task_serializer = "json"
    queued(a, "bulk")  # the in-memory broker is shared by the whole process: start from an empty queue
    return a


def test_send_turn_chains_sentiment_then_reply(app):
    send_turn(app, "m1", "c1", "bulk")
    (msg,) = queued(app, "bulk")
    assert msg["task"] == contract.CLASSIFY == "allinone.classify"
    assert msg["args"] == [{"message_id": "m1", "conversation_id": "c1"}]
    assert [c["task"] for c in msg["callbacks"]] == [contract.REPLY] == ["allinone.reply"]


def test_send_batches_asks_for_replies_only_when_told(app):
    batches = [[{"message_id": "m1", "conversation_id": "c1"}], [{"message_id": "m2", "conversation_id": "c2"}]]
    contract.send_batches(app, batches, "bulk")
    contract.send_batches(app, batches[:1], "bulk", reply=True)
    msgs = queued(app, "bulk")
    assert [m["task"] for m in msgs] == [contract.CLASSIFY_BATCH] * 3
    assert [m["args"][0] for m in msgs] == [batches[0], batches[1], batches[0]]
    assert [m["kwargs"] for m in msgs] == [{}, {}, {"reply": True}]


@pytest.mark.integration
def test_put_back_returns_an_unacknowledged_message_to_the_head_of_its_queue(redis_url):
    # Given two turns on the queue, and a consumer (a worker about to be killed) that took the first unacknowledged
    app = make_celery(Settings(redis_url=redis_url))
    send_turn(app, "m-old", "c", "live")
    send_turn(app, "m-new", "c", "live")
    r = redis.Redis.from_url(redis_url)
    with app.connection_for_read() as held:
        msg = held.channel().basic_get("live", no_ack=False)
        assert msg.decode()[0] == [{"message_id": "m-old", "conversation_id": "c"}]
        assert r.llen("live") == 1 and r.hexists("unacked", msg.delivery_tag)
        # When it is put back (its holder still has not acknowledged it)
        back = contract.put_back(app, [msg.delivery_tag, "no-such-tag"])
        # Then it is the next message taken, the broker holds it no more, and a second put-back does nothing
        assert back == {msg.delivery_tag}
        assert r.llen("live") == 2 and not r.hexists("unacked", msg.delivery_tag)
        assert json.loads(r.lindex("live", -1))["headers"]["id"] == msg.headers["id"]
        assert contract.put_back(app, [msg.delivery_tag]) == set()
