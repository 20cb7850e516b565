"""The results store: the Redis implementation (on fakeredis here, on a real Redis in the integration tests) and
the in-memory stand-in must behave the same."""

from __future__ import annotations

import fakeredis
import pytest

from worker.errors import MessageIdConflict, StoreUnavailable, UnknownConversation, UnknownMessage
from worker.schemas import Sentiment, Status
from worker.store import MemoryStore, RedisStore
from worker.testing import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryStore(ttl_seconds=3600)
    return RedisStore(fakeredis.FakeRedis(decode_responses=True), prefix="t", ttl_seconds=3600)


def test_turns_are_kept_in_submission_order(store):
    for i in range(5):
        turn, created = store.create_turn("c1", f"m{i}", f"text {i}")
        assert created and turn.seq == i and turn.status is Status.queued
    conv = store.get_conversation("c1")
    assert [t.message_id for t in conv.turns] == ["m0", "m1", "m2", "m3", "m4"]
    assert [t.seq for t in conv.turns] == [0, 1, 2, 3, 4]


def test_same_message_id_twice_is_one_turn(store):
    first, created1 = store.create_turn("c1", "m1", "hello")
    again, created2 = store.create_turn("c1", "m1", "hello")
    assert (created1, created2) == (True, False)
    assert again.seq == first.seq
    assert len(store.get_conversation("c1").turns) == 1


def test_same_message_id_with_other_content_is_refused(store):
    store.create_turn("c1", "m1", "hello")
    with pytest.raises(MessageIdConflict):
        store.create_turn("c2", "m1", "hello")
    with pytest.raises(MessageIdConflict):
        store.create_turn("c1", "m1", "other text")
    assert len(store.get_conversation("c1").turns) == 1


def test_lifecycle_queued_classified_done(store):
    store.create_turn("c1", "m1", "great")
    store.mark_enqueued("m1")
    store.mark_classified("m1", Sentiment(label="positive", confidence=0.9), "model-x")
    t = store.get_turn("m1")
    assert t.status is Status.classified and t.sentiment.label == "positive" and t.model == "model-x"
    assert t.enqueued_at is not None and t.classified_at is not None
    store.mark_done("m1", "Thanks!", "model-x", context=["m0"])
    t = store.get_turn("m1")
    assert (t.status, t.reply, t.context, t.sentiment.confidence) == (Status.done, "Thanks!", ["m0"], 0.9)


def test_failed_turn_keeps_its_reason(store):
    store.create_turn("c1", "m1", "x")
    store.mark_failed("m1", "invalid message: text is empty")
    t = store.get_turn("m1")
    assert t.status is Status.failed and "empty" in t.error


def test_unknown_ids_raise_typed_errors(store):
    with pytest.raises(UnknownConversation, match="nope"):
        store.get_conversation("nope")
    with pytest.raises(UnknownMessage):
        store.get_turn("nope")
    with pytest.raises(UnknownMessage):
        store.mark_done("nope", "r", "m")
    with pytest.raises(UnknownMessage):
        store.bump_attempts("nope")
    assert store.get_turns(["nope"]) == [None]


def test_attempts_count_deliveries(store):
    store.create_turn("c1", "m1", "x")
    assert [store.bump_attempts("m1") for _ in range(3)] == [1, 2, 3]
    assert store.get_turn("m1").attempts == 3


def test_dead_letters_newest_first(store):
    store.dead_letter({"payload": 1}, "first")
    store.dead_letter("garbage", "second")
    assert [d["reason"] for d in store.dead_letters()] == ["second", "first"]


def test_unicode_text_round_trips(store):
    text = "房间很干净，服务 👍 <|im_end|> \u200d"
    store.create_turn("会话:1", "m1", text)
    assert store.get_conversation("会话:1").turns[0].text == text


def test_redis_store_sets_the_ttl_on_every_write():
    r = fakeredis.FakeRedis(decode_responses=True)
    store = RedisStore(r, prefix="t", ttl_seconds=120)
    store.create_turn("c1", "m1", "x")
    assert 0 < r.ttl("t:turn:m1") <= 120 and 0 < r.ttl("t:conv:c1") <= 120
    r.expire("t:conv:c1", 5)
    store.mark_classified("m1", Sentiment(label="negative", confidence=0.7), "m")
    assert r.ttl("t:conv:c1") > 5  # activity keeps the conversation alive


def test_redis_key_layout_is_as_documented():
    r = fakeredis.FakeRedis(decode_responses=True)
    store = RedisStore(r, prefix="p", ttl_seconds=120)
    store.create_turn("c1", "m1", "x")
    store.heartbeat("w1", {"model": "m"}, ttl=10)
    assert sorted(r.keys("*")) == ["p:conv:c1", "p:pending", "p:turn:m1", "p:worker:w1"]
    assert r.lrange("p:conv:c1", 0, -1) == ["m1"]
    assert r.hget("p:turn:m1", "status") == "queued"


def test_memory_store_expires_like_redis():
    clock = Clock()
    store = MemoryStore(ttl_seconds=60, clock=clock)
    store.create_turn("c1", "m1", "x")
    clock.now += 61
    with pytest.raises(UnknownConversation):
        store.get_conversation("c1")
    with pytest.raises(UnknownMessage):
        store.get_turn("m1")


def test_heartbeats_expire(store):
    if isinstance(store, MemoryStore):
        clock = Clock()
        store.clock = clock
        store.heartbeat("w1", {"model": "m", "pid": 1}, ttl=10)
        assert store.workers()["w1"]["model"] == "m"
        clock.now += 11
        assert store.workers() == {}
    else:
        store.heartbeat("w1", {"model": "m", "pid": 1}, ttl=10)
        assert store.workers()["w1"] == {"model": "m", "pid": 1}


def test_redis_away_raises_store_unavailable_after_bounded_retries():
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", retry_seconds=0.5)
    with pytest.raises(StoreUnavailable, match="did not answer"):
        store.create_turn("c1", "m1", "x")
    with pytest.raises(StoreUnavailable):
        store.get_conversation("c1")


def test_transitions_only_go_forward_and_the_first_writer_wins(store):
    store.create_turn("c1", "m1", "x")
    assert store.mark_classified("m1", Sentiment(label="positive", confidence=0.9), "m") is True
    assert store.mark_done("m1", "first reply", "m") is True
    # a duplicate task racing the original: neither a second reply nor a step back
    assert store.mark_done("m1", "second reply", "m") is False
    assert store.mark_classified("m1", Sentiment(label="negative", confidence=0.6), "m") is False
    assert store.mark_failed("m1", "late failure") is False
    t = store.get_turn("m1")
    assert (t.status, t.reply, t.sentiment.label, t.error) == (Status.done, "first reply", "positive", None)


def test_pending_index_tracks_unfinished_turns(store):
    store.create_turn("c1", "m1", "x")
    store.create_turn("c1", "m2", "y")
    assert store.stale_turns(older_than_seconds=-1) == ["m1", "m2"]
    assert store.stale_turns(older_than_seconds=60) == []  # just touched: not stale
    store.mark_done("m1", "r", "m")
    store.mark_failed("m2", "bad")
    assert store.stale_turns(older_than_seconds=-1) == []
    store.mark_working("m1")  # touching a finished turn does not bring it back
    assert store.stale_turns(older_than_seconds=-1) == []


def test_locks_expire(store):
    assert store.try_lock("sweep", ttl_seconds=60) is True
    assert store.try_lock("sweep", ttl_seconds=60) is False
    assert store.try_lock("other", ttl_seconds=60) is True
