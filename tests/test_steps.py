"""What the tasks do, on the in-memory store and the tiny engine (no Celery, no Redis)."""

from __future__ import annotations

import time

import pytest

from worker import steps
from worker.errors import InvalidMessage, NotReady, UnknownMessage
from worker.events import TokenPolicy
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

    def reply(self, history, text, on_text=None):
        self.replies.append((list(history), text))
        return self.engine.reply(history, text, on_text=on_text)


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


# ------------------------------------------------------------------------------------------- events


def test_a_reply_streams_its_text_as_token_events_and_ends_with_done(engine, store):
    store.create_turn("c", "m0", "hello there", queue="live")
    steps.classify_turn(engine, store, "m0", 100)
    turn = steps.reply_turn(engine, store, "m0", 60, tokens=TokenPolicy(interval=0.0))
    evs = store.read_events("m0")
    assert [e.type for e in evs if e.type != "token"] == ["queued", "classified", "done"]
    assert evs[-1].type == "done" and evs[-1].data["reply"] == turn.reply and evs[-1].data["context"] == []
    tokens = [e.data["text"] for e in evs if e.type == "token"]
    assert tokens and "".join(tokens).strip() == turn.reply
    timing = evs[-1].data["timing"]
    assert timing["new_tokens"] > 0 and timing["first_token_at"] >= turn.classified_at


def test_bulk_turns_and_token_events_off_write_no_tokens(engine, store):
    store.create_turns([("c", "b0", "hello")], queue="bulk")
    store.create_turn("c2", "m0", "hello", queue="live")
    for mid in ("b0", "m0"):
        steps.classify_turn(engine, store, mid, 100)
    steps.reply_turn(engine, store, "b0", 60, tokens=TokenPolicy(interval=0.0, skip_queue="bulk"))
    steps.reply_turn(engine, store, "m0", 60, tokens=None)
    assert [e.type for e in store.read_events("b0")] == ["classified", "done"]
    assert [e.type for e in store.read_events("m0")] == ["queued", "classified", "done"]


def test_a_reply_cut_off_mid_stream_restarts_and_the_reader_can_drop_the_partial_text(engine, store):
    store.create_turn("c", "m0", "hello there")
    steps.classify_turn(engine, store, "m0", 100)

    class Dies(RuntimeError):
        pass

    def dying_reply(history, text, on_text=None):
        on_text("partial ")
        raise Dies("the worker died mid-reply")

    engine.reply, real_reply = dying_reply, engine.reply
    with pytest.raises(Dies):
        steps.reply_turn(engine, store, "m0", 60, tokens=TokenPolicy(interval=0.0))
    engine.reply = real_reply
    turn = steps.reply_turn(engine, store, "m0", 60, tokens=TokenPolicy(interval=0.0))
    evs = store.read_events("m0")
    restart = next(i for i, e in enumerate(evs) if e.type == "restart")
    assert evs[restart - 1].data == {"text": "partial "} and evs[restart].data == {"attempt": 2}
    # what a reader shows: the tokens after the last restart, then the reply of done
    after = "".join(e.data["text"] for e in evs[restart:] if e.type == "token")
    assert after.strip() == turn.reply and evs[-1].type == "done" and turn.reply_attempts == 2
