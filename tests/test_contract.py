"""Sending a turn's work: task names and payloads as the worker expects them."""

from __future__ import annotations

import pytest
from celery import Celery
from test_producer import queued

from worker import contract
from worker.contract import send_turn


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
