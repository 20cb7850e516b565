"""The task glue on the in-memory store and the tiny engine: poison, permanent errors, retries that run out.

(The same tasks run in a real worker process in tests/test_integration_worker.py and tests/test_reliability.py.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker import runtime, tasks
from worker.schemas import Sentiment, Status
from worker.store import MemoryStore


@pytest.fixture()
def store(tiny_engine, monkeypatch):
    s = MemoryStore()
    monkeypatch.setattr(runtime, "_store", s)
    monkeypatch.setattr(runtime, "_engine", tiny_engine)
    return s


def test_poison_payload_is_dead_lettered_and_the_chain_stops(store):
    result = tasks.classify.apply(args=["garbage"])
    assert result.state == "IGNORED"
    (dead,) = store.dead_letters()
    assert dead["payload"] == {"task": "allinone.classify", "payload": "garbage"}
    assert "malformed task payload" in dead["reason"]


def test_a_payload_for_no_turn_is_dead_lettered(store):
    tasks.reply.apply(args=[{"message_id": "gone", "conversation_id": "c"}])
    (dead,) = store.dead_letters()
    assert "gone" in dead["reason"]


def test_classify_returns_the_payload_for_the_chain(store):
    store.create_turn("c", "m1", "hello")
    payload = {"message_id": "m1", "conversation_id": "c"}
    assert tasks.classify.apply(args=[payload]).get() == payload
    assert store.get_turn("m1").status is Status.classified and store.get_turn("m1").attempts == 1


def test_retries_that_run_out_fail_the_turn_instead_of_leaving_it_queued(store):
    store.create_turn("c", "m1", "hello")
    payload = {"message_id": "m1", "conversation_id": "c"}
    tasks.classify.on_failure(ConnectionError("Redis gone"), "task-id", (payload,), {}, None)
    t = store.get_turn("m1")
    assert t.status is Status.failed and "gave up: ConnectionError: Redis gone" == t.error
    assert store.dead_letters() == []


def test_failure_of_an_unreadable_message_is_dead_lettered(store):
    tasks.reply.on_failure(TypeError("reply() missing 1 required positional argument"), "tid", (), {}, None)
    (dead,) = store.dead_letters()
    assert dead["payload"]["task"] == "allinone.reply" and "TypeError" in dead["reason"]


def test_batch_task_skips_bad_payloads_and_labels_the_rest(store):
    for i in range(3):
        store.create_turn(f"c{i}", f"m{i}", f"message {i}")
    good = [{"message_id": f"m{i}", "conversation_id": f"c{i}"} for i in range(3)]
    out = tasks.classify_batch.apply(args=[good + ["junk"]]).get()
    assert out == {"m0": "classified", "m1": "classified", "m2": "classified"}
    assert all(store.get_turn(f"m{i}").status is Status.done for i in range(3))
    assert len(store.dead_letters()) == 1


def test_batch_task_with_replies_sends_one_reply_per_classified_turn_on_its_queue(store, monkeypatch):
    from worker import contract
    from worker.settings import Settings

    # replies one by one, each its own task
    monkeypatch.setattr(tasks, "get_settings", lambda: Settings(reply_batch_size=1))
    sent = []
    monkeypatch.setattr(contract, "send_replies", lambda app, payloads, queue: sent.append((payloads, queue)))
    for i in range(3):
        store.create_turn(f"c{i}", f"m{i}", f"message {i}" if i != 1 else "   ")  # m1: no text, fails
    store.mark_classified("m2", Sentiment(label="positive", confidence=0.9), "earlier delivery")
    batch = [{"message_id": f"m{i}", "conversation_id": f"c{i}"} for i in range(3)]
    out = tasks.classify_batch.apply(args=[batch], kwargs={"reply": True}).get()
    assert out == {"m0": "classified", "m1": "failed", "m2": "skipped"}
    # m0 classified now, m2 by an earlier delivery whose replies may be lost: both get a reply task; m1 not
    ((payloads, queue),) = sent
    assert [p.message_id for p in payloads] == ["m0", "m2"] and queue == "bulk"
    assert store.get_turn("m0").status is Status.classified and store.get_turn("m1").status is Status.failed


def test_batch_task_with_replies_writes_ready_replies_together_and_sends_the_rest(store, monkeypatch):
    from worker import contract

    sent = []
    monkeypatch.setattr(contract, "send_replies", lambda app, payloads, queue: sent.append((payloads, queue)))
    # Given two conversations, one of them with two turns in the batch
    store.create_turn("c0", "m0", "first message")
    store.create_turn("c0", "m1", "second message")
    store.create_turn("c1", "m2", "another conversation")
    batch = [{"message_id": m, "conversation_id": c} for m, c in (("m0", "c0"), ("m1", "c0"), ("m2", "c1"))]
    assert tasks.classify_batch.apply(args=[batch], kwargs={"reply": True}).get() == dict.fromkeys(
        ("m0", "m1", "m2"), "classified")
    # Then the first turn of each conversation is replied in the batch; the later turn (its prompt needs m0's
    # reply) is left to its own reply task
    assert store.get_turn("m0").status is Status.done and store.get_turn("m2").status is Status.done
    ((payloads, queue),) = sent
    assert [p.message_id for p in payloads] == ["m1"] and store.get_turn("m1").status is Status.classified


def test_a_batch_that_fails_fails_every_unfinished_turn_of_it(store, monkeypatch):
    from worker import steps
    from worker.errors import PermanentError

    for i in range(3):
        store.create_turn(f"c{i}", f"m{i}", f"message {i}")
    store.mark_classified("m2", Sentiment(label="positive", confidence=0.9), "m")
    store.mark_done("m2", "", "m")

    def broken(*_a, **_k):
        raise PermanentError("the model cannot read this batch")

    monkeypatch.setattr(steps, "classify_turns", broken)
    batch = [{"message_id": f"m{i}", "conversation_id": f"c{i}"} for i in range(3)]
    assert tasks.classify_batch.apply(args=[batch]).state == "IGNORED"
    assert [store.get_turn(f"m{i}").status for i in range(3)] == [Status.failed, Status.failed, Status.done]
    assert store.get_turn("m1").error == "the model cannot read this batch"


def test_waiting_for_order_is_not_limited_by_celerys_default_of_three_retries():
    # task.retry(max_retries=None) means "the task's own limit"; Celery's default of 3 made replies that waited
    # for a slow earlier turn fail (the chaos run showed it). The order wait bounds the waiting instead.
    assert tasks.reply.max_retries is None and tasks.classify.max_retries is None


def received(name: str, args: list, kwargs: dict | None = None, task_id: str = "t1") -> SimpleNamespace:
    """What Celery hands the task_received signal: the request of a message the worker just took."""
    return SimpleNamespace(id=task_id, name=name, args=args, kwargs=kwargs or {},
                           message=SimpleNamespace(delivery_tag="tag-1"), delivery_info={"routing_key": "bulk"})


def test_a_received_message_is_held_until_its_task_ends(store, monkeypatch):
    monkeypatch.setattr(runtime, "_name", "w1")
    payload = {"message_id": "m1", "conversation_id": "c"}
    tasks._hold(received("allinone.reply", [payload]))
    (held,) = store.held_by("w1")
    assert (held.task, held.delivery_tag, held.queue, held.payloads) == ("allinone.reply", "tag-1", "bulk", [payload])
    tasks._release("t1")
    assert store.held_by("w1") == []


def test_a_held_bulk_batch_keeps_its_payloads_and_its_reply_flag():
    payloads = [{"message_id": f"b{i}", "conversation_id": "c"} for i in range(3)]
    held = tasks.held_task(received("allinone.classify_batch", [payloads], {"reply": True}))
    assert held.payloads == payloads and held.reply is True and held.message_ids() == ["b0", "b1", "b2"]
