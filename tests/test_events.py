"""A turn's event stream: written with the status change it reports, read and resumed by id, blocking reads, the
restart of a reply, and the throttle that batches token events. Both stores (memory, fakeredis, a real Redis)
run the same tests."""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest
import redis

from worker import events
from worker.errors import UnknownMessage
from worker.events import Event, TokenEvents, TokenPolicy
from worker.schemas import Sentiment
from worker.settings import Settings
from worker.store import MemoryStore, RedisStore
from worker.testing import ManualClock

POSITIVE = Sentiment(label="positive", confidence=0.9)


@pytest.fixture(params=["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.integration)])
def store(request):
    if request.param == "memory":
        return MemoryStore(ttl_seconds=3600, clock=ManualClock(time.time()))
    if request.param == "fakeredis":
        client = fakeredis.FakeRedis(decode_responses=True)
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
    return RedisStore(client, prefix="t", ttl_seconds=3600)


def types(evs: list[Event]) -> list[str]:
    return [e.type for e in evs]


# ---------------------------------------------------------------------------------------------- the stream


def test_each_status_change_writes_its_event_in_order(store):
    turn, _ = store.create_turn("c1", "m1", "hello", queue="live")
    store.mark_enqueued("m1")  # no event: not a status change
    store.mark_classified("m1", POSITIVE, "model")
    store.append_event("m1", events.TOKEN, {"text": "Hi"})
    store.mark_done("m1", "Hi there", "model", context=[], timing={"new_tokens": 3.0})
    evs = store.read_events("m1")
    assert types(evs) == ["queued", "classified", "token", "done"]
    assert evs[0].data == {"seq": 0, "conversation_id": "c1", "queue": "live"}
    assert evs[1].data == {"label": "positive", "confidence": 0.9, "method": "prompt"}
    assert evs[3].data["reply"] == "Hi there" and evs[3].data["timing"] == {"new_tokens": 3.0}
    assert evs[3].terminal and not evs[2].terminal
    ids = [e.id for e in evs]
    assert all(events.id_after(later, earlier) for earlier, later in zip(ids[:-1], ids[1:], strict=True))


def test_a_transition_that_loses_the_race_writes_no_event(store):
    store.create_turn("c1", "m1", "hello")
    assert store.mark_done("m1", "first", "model")
    assert not store.mark_done("m1", "second", "model")  # a duplicate task: the first writer won
    assert not store.mark_failed("m1", "late")
    assert not store.mark_classified("m1", POSITIVE, "model")
    assert types(store.read_events("m1")) == ["queued", "done"]


def test_a_failure_says_why(store):
    store.create_turn("c1", "m1", "hello")
    store.mark_failed("m1", "invalid message: text is empty")
    assert store.read_events("m1")[-1] == Event(
        store.read_events("m1")[-1].id, "failed", {"reason": "invalid message: text is empty"}
    )


def test_a_turn_submitted_again_writes_no_second_queued_event(store):
    store.create_turn("c1", "m1", "hello")
    store.create_turn("c1", "m1", "hello")
    assert types(store.read_events("m1")) == ["queued"]


def test_bulk_turns_have_no_queued_event_but_hear_the_rest(store):
    store.create_turns([("c1", "b1", "one"), ("c1", "b2", "two")], queue="bulk")
    assert store.read_events("b1") == []
    store.mark_classified("b1", POSITIVE, "model")
    store.mark_done("b1", "", "model")
    assert types(store.read_events("b1")) == ["classified", "done"]


def test_a_reader_resumes_after_any_event_id(store):
    store.create_turn("c1", "m1", "hello")
    for piece in ("a", "b", "c"):
        store.append_event("m1", events.TOKEN, {"text": piece})
    first, *rest = store.read_events("m1")
    assert [e.data["text"] for e in store.read_events("m1", after=rest[0].id)] == ["b", "c"]
    assert store.read_events("m1", after=rest[-1].id) == []
    assert [e.id for e in store.read_events("m1", after=first.id, count=2)] == [rest[0].id, rest[1].id]


def test_reading_a_stream_nobody_wrote_is_empty_not_an_error(store):
    assert store.read_events("never", block=None) == []


def test_a_blocked_reader_wakes_when_an_event_is_written(store):
    if isinstance(store, RedisStore) and isinstance(store.r, fakeredis.FakeRedis):
        pytest.skip("fakeredis does not wake a blocked XREAD from another thread")
    store.create_turn("c1", "m1", "hello")
    (queued,) = store.read_events("m1")
    timer = threading.Timer(0.3, store.mark_classified, args=("m1", POSITIVE, "model"))
    timer.start()
    t0 = time.monotonic()
    got = store.read_events("m1", after=queued.id, block=5.0)
    assert types(got) == ["classified"] and 0.2 < time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    assert store.read_events("m1", after=got[0].id, block=0.2) == []  # nothing comes: back after the block
    assert 0.15 < time.monotonic() - t0 < 1.5


def test_the_stream_expires_with_its_turn():
    clock = ManualClock()
    store = MemoryStore(ttl_seconds=60, clock=clock)
    store.create_turn("c1", "m1", "hello")
    clock.now += 61
    with pytest.raises(UnknownMessage):
        store.get_turn("m1")
    assert store.read_events("m1") == []
    r = fakeredis.FakeRedis(decode_responses=True)
    RedisStore(r, prefix="t", ttl_seconds=60).create_turn("c1", "m1", "hello")
    assert 0 < r.ttl("t:events:m1") <= 60


# ---------------------------------------------------------------------------------------------- restart


def test_a_reply_attempt_after_partial_tokens_says_restart_with_its_number(store):
    store.create_turn("c1", "m1", "hello")
    store.mark_classified("m1", POSITIVE, "model")
    assert store.begin_reply("m1") == 1  # the first attempt: nothing to take back
    store.append_event("m1", events.TOKEN, {"text": "Hel"})
    # the worker dies here; the task is delivered again
    assert store.begin_reply("m1") == 2
    store.append_event("m1", events.TOKEN, {"text": "Hello"})
    store.mark_done("m1", "Hello", "model")
    assert types(store.read_events("m1")) == ["queued", "classified", "token", "restart", "token", "done"]
    assert store.read_events("m1")[3].data == {"attempt": 2}
    assert store.get_turn("m1").reply_attempts == 2


def test_an_attempt_cut_off_before_its_first_token_needs_no_restart(store):
    store.create_turn("c1", "m1", "hello")
    store.mark_classified("m1", POSITIVE, "model")
    store.begin_reply("m1")
    assert store.begin_reply("m1") == 2
    assert types(store.read_events("m1")) == ["queued", "classified"]
    with pytest.raises(UnknownMessage):
        store.begin_reply("never")


# ---------------------------------------------------------------------------------------------- token events


def test_token_events_send_the_first_piece_at_once_then_one_per_interval():
    clock = ManualClock(0.0)
    sent: list[str] = []
    tokens = TokenEvents(sent.append, interval=0.2, clock=clock)
    tokens("Hel")  # the first piece goes at once: the reader sees the reply start without delay
    for piece in ("lo", ",", " wor"):
        clock.now += 0.05
        tokens(piece)
    assert sent == ["Hel"]
    clock.now += 0.05  # 0.2 s since the first event
    tokens("ld")
    tokens("")  # a token that adds no text yet (half a character) is no event
    tokens("!")
    tokens.flush()
    tokens.flush()  # nothing pending: no empty event
    assert sent == ["Hel", "lo, world", "!"] and tokens.events == 3


def test_token_policy_follows_the_settings():
    assert TokenPolicy.from_settings(Settings(token_events="off")) is None
    live = TokenPolicy.from_settings(Settings(token_events="live", token_event_seconds=0.1, bulk_queue="bulk"))
    assert live is not None and live.interval == 0.1
    assert live.streams("live") and live.streams(None) and not live.streams("bulk")
    every = TokenPolicy.from_settings(Settings(token_events="all"))
    assert every is not None and every.streams("bulk")


def test_event_ids_compare_and_are_checked():
    assert events.id_after("1700000000001-0", "1700000000000-5")
    assert events.id_after("1700000000000-2", "1700000000000-1")
    assert events.id_after("1700000000000-0", "0") and not events.id_after("0-0", "0")
    assert events.check_event_id("1700000000000-3") == "1700000000000-3"
    for bad in ("", "abc", "17-x", "-1", "1-2-3"):
        with pytest.raises(ValueError):
            events.check_event_id(bad)
    with pytest.raises(ValueError):
        events.entry("tokens", {})
