"""What the tasks do, on the in-memory store and the tiny engine (no Celery, no Redis)."""

from __future__ import annotations

import time

import pytest

from worker import steps
from worker.errors import InvalidMessage, NotReady, UnknownMessage
from worker.schemas import Status
from worker.store import MemoryStore
from worker.testing import ManualClock


class Recording:
    """The real engine, with a record of what each reply was asked to see."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.model_id = engine.model_id
        self.replies: list[tuple[list[tuple[str, str]], str]] = []
        self.classified: list[list[str]] = []

    def classify(self, texts, batch_size=None):
        self.classified.append(list(texts))
        return self.engine.classify(texts, batch_size)

    def reply(self, history, text):
        self.replies.append((list(history), text))
        return self.engine.reply(history, text)


@pytest.fixture()
def store():
    return MemoryStore()


@pytest.fixture()
def engine(tiny_engine):
    return Recording(tiny_engine)


def test_classify_then_reply_fills_the_turn(engine, store):
    store.create_turn("c", "m0", "The room was lovely")
    t = steps.classify_turn(engine, store, "m0", max_chars=100)
    assert t.status is Status.classified and t.sentiment is not None
    t = steps.reply_turn(engine, store, "m0", order_wait_seconds=60)
    assert t.status is Status.done and t.reply is not None and t.context == []
    assert t.sentiment.label in ("positive", "negative") and t.model == engine.model_id


def test_redelivered_steps_do_nothing_twice(engine, store):
    store.create_turn("c", "m0", "hello")
    steps.classify_turn(engine, store, "m0", 100)
    steps.reply_turn(engine, store, "m0", 60)
    done = store.get_turn("m0")
    # the same tasks delivered again (a worker died before acking): no second label, no second reply
    steps.classify_turn(engine, store, "m0", 100)
    steps.reply_turn(engine, store, "m0", 60)
    assert store.get_turn("m0") == done
    assert len(engine.classified) == 1 and len(engine.replies) == 1


def test_second_turn_sees_exactly_the_first(engine, store):
    store.create_turn("c", "m0", "first message")
    store.create_turn("c", "m1", "second message")
    for mid in ("m0", "m1"):
        steps.classify_turn(engine, store, mid, 100)
        steps.reply_turn(engine, store, mid, 60)
    first_reply = store.get_turn("m0").reply
    assert engine.replies[1] == ([("first message", first_reply)], "second message")
    assert store.get_turn("m1").context == ["m0"]


def test_reply_waits_for_an_earlier_turn_still_in_flight(engine, store):
    store.create_turn("c", "m0", "first")
    store.create_turn("c", "m1", "second")
    steps.classify_turn(engine, store, "m1", 100)
    with pytest.raises(NotReady, match=r"earlier turn\(s\) \[0\]"):
        steps.reply_turn(engine, store, "m1", order_wait_seconds=60)
    assert store.get_turn("m1").status is Status.classified and engine.replies == []


def test_a_long_queue_before_the_turn_does_not_count_as_waiting(engine):
    clock = ManualClock(now=time.time() - 10_000)
    store = MemoryStore(clock=clock)
    store.create_turn("c", "m0", "first")
    store.create_turn("c", "m1", "second")  # submitted long ago, behind a backlog...
    clock.now = time.time()
    steps.classify_turn(engine, store, "m1", 100)  # ...and only now ready for its reply
    with pytest.raises(NotReady):
        steps.reply_turn(engine, store, "m1", order_wait_seconds=60)


def test_reply_stops_waiting_after_the_bound(engine, store):
    store.create_turn("c", "m0", "first, never finished")
    store.create_turn("c", "m1", "second")
    steps.classify_turn(engine, store, "m1", 100)
    t = steps.reply_turn(engine, store, "m1", order_wait_seconds=0)
    assert t.status is Status.done and t.context == []


def test_failed_earlier_turns_are_left_out_of_the_history(engine, store):
    store.create_turn("c", "m0", "first")
    store.mark_failed("m0", "invalid message")
    store.create_turn("c", "m1", "second")
    steps.classify_turn(engine, store, "m1", 100)
    assert steps.reply_turn(engine, store, "m1", 60).context == []


def test_text_over_the_limit_fails_the_turn_with_the_reason(engine, store):
    store.create_turn("c", "m0", "x" * 50)
    with pytest.raises(InvalidMessage):
        steps.classify_turn(engine, store, "m0", max_chars=10)
    t = store.get_turn("m0")
    assert t.status is Status.failed and "limit is 10" in t.error and engine.classified == []


def test_unknown_turn_is_a_permanent_error(engine, store):
    with pytest.raises(UnknownMessage):
        steps.classify_turn(engine, store, "never", 100)


def test_batch_classifies_good_turns_and_reports_the_rest(engine, store):
    for i, text in enumerate(["good one", "x" * 50, "another good one"]):
        store.create_turn(f"c{i}", f"m{i}", text)
    steps.classify_turn(engine, store, "m2", 100)  # already classified: skipped
    out = steps.classify_turns(engine, store, ["m0", "m1", "m2", "missing"], max_chars=10 ** 3 // 100 * 4)
    assert out == {"m0": "classified", "m1": "failed", "m2": "skipped", "missing": "missing"}
    assert engine.classified[-1] == ["good one"]  # one batched call for everything that needed it
    steps.finish_sentiment_only(store, ["m0", "m1", "m2"], engine.model_id)
    assert [store.get_turn(m).status for m in ("m0", "m1", "m2")] == [Status.done, Status.failed, Status.done]
    assert store.get_turn("m0").reply == ""


def test_batch_labels_equal_single_labels(engine, store):
    texts = ["great stay", "房间太小", "never again", "很好"]
    for i, text in enumerate(texts):
        store.create_turn(f"c{i}", f"m{i}", text)
    steps.classify_turns(engine, store, [f"m{i}" for i in range(4)], 100)
    batched = [store.get_turn(f"m{i}").sentiment for i in range(4)]
    single = [engine.engine.classify([t])[0] for t in texts]
    assert [s.label for s in batched] == [s.label for s in single]
    assert [s.confidence for s in batched] == pytest.approx([s.confidence for s in single], abs=1e-4)
