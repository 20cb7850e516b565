"""The results store: the Redis implementation (on fakeredis, and on a real Redis with the integration tests) and
the in-memory stand-in run the same tests and must behave the same."""

from __future__ import annotations

import inspect

import fakeredis
import pytest
import redis

from worker.errors import MessageIdConflict, StoreUnavailable, UnknownConversation, UnknownMessage
from worker.schemas import HeldTask, Sentiment, Status
from worker.store import Keys, MemoryStore, RedisStore, ResultsStore
from worker.testing import ManualClock, free_port


@pytest.fixture(params=["memory", "fakeredis", pytest.param("redis", marks=pytest.mark.integration)])
def store(request):
    if request.param == "memory":
        return MemoryStore(ttl_seconds=3600, clock=ManualClock())
    if request.param == "fakeredis":
        client = fakeredis.FakeRedis(decode_responses=True)
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
    return RedisStore(client, prefix="t", ttl_seconds=3600)


def let_time_pass(store, seconds: float) -> bool:
    """Move the memory store's clock; False for a Redis store, whose time is the wall clock."""
    if isinstance(store, MemoryStore):
        store.clock.now += seconds
        return True
    return False


def test_both_stores_are_the_whole_protocol_with_its_parameters():
    calls = [name for name in vars(ResultsStore) if not name.startswith("_") and callable(vars(ResultsStore)[name])]
    assert {"create_turns", "mark_enqueued_many", "get_statuses", "heartbeat", "dead_letter"} <= set(calls)
    for name in calls:
        expected = list(inspect.signature(getattr(ResultsStore, name)).parameters)
        for impl in (RedisStore, MemoryStore):
            assert list(inspect.signature(getattr(impl, name)).parameters) == expected, f"{impl.__name__}.{name}"


# -------------------------------------------------------------------------------------------------- turns


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


def test_unicode_text_round_trips(store):
    text = "房间很干净，服务 👍 <|im_end|> \u200d"
    store.create_turn("会话:1", "m1", text)
    assert store.get_conversation("会话:1").turns[0].text == text


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


# ----------------------------------------------------------------------------------------- the bulk calls


def test_bulk_create_is_create_turn_for_many_rows_in_order(store):
    # Given a turn already stored, and a batch that repeats it, conflicts with it, and adds two
    store.create_turn("c1", "m0", "zero")
    rows = [("c1", "m1", "one"), ("c1", "m0", "zero"), ("c2", "m0", "zero"), ("c1", "m2", "two")]

    out = store.create_turns(rows, queue="bulk")

    # Then each row has its answer in its place: created with the next seq, the same turn again, or the conflict
    (t1, new1), (t0, new0), conflict, (t2, new2) = out
    assert (t1.seq, new1, t1.queue) == (1, True, "bulk") and (t2.seq, new2) == (2, True)
    assert (t0.seq, new0, t0.text) == (0, False, "zero")
    assert isinstance(conflict, MessageIdConflict)
    assert [t.message_id for t in store.get_conversation("c1").turns] == ["m0", "m1", "m2"]
    assert store.get_turn("m1") == t1
    # and bulk turns stay out of the pending index (a bulk job re-enqueues its unfinished rows itself)
    assert store.stale_turns(older_than_seconds=-1) == ["m0"]


def test_bulk_enqueued_and_statuses(store):
    store.create_turns([("c1", "m1", "one"), ("c1", "m2", "two")])
    store.mark_failed("m2", "bad")

    store.mark_enqueued_many(["m1", "gone"])

    assert store.get_turn("m1").enqueued_at is not None and store.get_turn("m2").enqueued_at is None
    assert store.get_turns(["gone"]) == [None]  # marking did not create it
    assert store.get_statuses(["m1", "m2", "gone"]) == [Status.queued, Status.failed, None]


# ------------------------------------------------------------------------------ time: expiry, the pending index


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


def test_a_turn_nobody_touches_goes_stale_and_working_on_it_makes_it_fresh():
    # Given two turns, one submitted 100 s before the other
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.create_turn("c", "old", "x")
    clock.now += 100
    store.create_turn("c", "new", "y")
    # Then only the old one is stale, oldest first with a bound
    assert store.stale_turns(older_than_seconds=30) == ["old"]
    assert store.stale_turns(older_than_seconds=-1, limit=1) == ["old"]
    # When a task works on it, it is fresh again
    store.mark_working("old")
    assert store.stale_turns(older_than_seconds=30) == []


def test_redis_store_sets_the_ttl_on_every_write():
    r = fakeredis.FakeRedis(decode_responses=True)
    store = RedisStore(r, prefix="t", ttl_seconds=120)
    keys = store.keys
    store.create_turn("c1", "m1", "x")
    assert 0 < r.ttl(keys.turn("m1")) <= 120 and 0 < r.ttl(keys.conv("c1")) <= 120
    r.expire(keys.conv("c1"), 5)
    store.mark_classified("m1", Sentiment(label="negative", confidence=0.7), "m")
    assert r.ttl(keys.conv("c1")) > 5  # activity keeps the conversation alive


def test_memory_store_expires_like_redis():
    clock = ManualClock()
    store = MemoryStore(ttl_seconds=60, clock=clock)
    store.create_turn("c1", "m1", "x")
    clock.now += 61
    with pytest.raises(UnknownConversation):
        store.get_conversation("c1")
    with pytest.raises(UnknownMessage):
        store.get_turn("m1")


def test_activity_keeps_a_memory_conversation_alive():
    clock = ManualClock()
    store = MemoryStore(ttl_seconds=60, clock=clock)
    store.create_turn("c1", "m1", "x")
    clock.now += 50
    store.mark_enqueued("m1")
    clock.now += 50  # 100 s after the turn was created, 50 s after its last write
    assert store.get_conversation("c1").turns[0].message_id == "m1"


def test_the_memory_store_clock_writes_every_timestamp():
    # Given a memory store on a clock tests move
    clock = ManualClock(now=5000.0)
    store = MemoryStore(clock=clock)
    # When a turn goes through its life, some time between each step
    store.create_turn("c1", "m1", "x")
    clock.now += 1
    store.mark_enqueued("m1")
    clock.now += 1
    store.mark_classified("m1", Sentiment(label="positive", confidence=0.9), "m")
    clock.now += 1
    store.mark_done("m1", "r", "m")
    store.dead_letter("garbage", "why")
    # Then every timestamp is the clock's
    t = store.get_turn("m1")
    assert (t.created_at, t.enqueued_at, t.classified_at, t.done_at) == (5000.0, 5001.0, 5002.0, 5003.0)
    assert store.dead_letters()[0]["at"] == 5003.0


# ----------------------------------------------------------------------------------------- the worker side


def test_heartbeats_expire(store):
    store.heartbeat("w1", {"model": "m", "pid": 1, "pair": (1, 2)}, ttl=10)
    assert store.workers() == {"w1": {"model": "m", "pid": 1, "pair": [1, 2]}}  # values went through JSON
    if let_time_pass(store, 11):
        assert store.workers() == {}
    else:
        assert 0 < store.r.ttl(store.keys.worker("w1")) <= 10


def test_locks_expire(store):
    assert store.try_lock("sweep", ttl_seconds=60) is True
    assert store.try_lock("sweep", ttl_seconds=60) is False
    assert store.try_lock("other", ttl_seconds=60) is True
    if let_time_pass(store, 61):
        assert store.try_lock("sweep", ttl_seconds=60) is True
    else:
        assert 0 < store.r.ttl(store.keys.lock("sweep")) <= 60


def held(task_id: str, *message_ids: str) -> HeldTask:
    return HeldTask(task_id=task_id, task="allinone.reply", delivery_tag=f"tag-{task_id}", queue="live",
                    payloads=[{"message_id": m, "conversation_id": "c"} for m in message_ids], received_at=1.0)


def test_a_worker_holds_a_task_until_its_task_ends(store):
    store.heartbeat("w1", {"pid": 1}, ttl=10)
    store.hold("w1", held("t1", "m1"))
    store.hold("w1", held("t2", "m2", "m3"))
    assert sorted(t.task_id for t in store.held_by("w1")) == ["t1", "t2"]
    assert store.held_message_ids() == {"m1", "m2", "m3"}
    store.release("w1", "t1")
    assert [t.task_id for t in store.held_by("w1")] == ["t2"]
    assert store.held_message_ids() == {"m2", "m3"}
    assert store.dead_holders() == []  # it beats


def test_only_a_dead_workers_messages_are_claimed_and_by_one_claimer_only(store):
    # Given a live worker, one whose heartbeat is gone (killed; its key expired), and us
    store.heartbeat("alive", {"pid": 1}, ttl=10)
    store.hold("alive", held("t1", "m1"))
    store.hold("dead", held("t2", "m2"))
    store.heartbeat("me", {"pid": 1}, ttl=10)
    store.hold("me", held("t3", "m3"))
    assert store.dead_holders() == ["dead"]
    # When we claim: the live worker is never robbed, the dead one's records move to us, and a second claimer
    # gets nothing
    assert store.claim_held("alive", by="me") is None
    assert [t.task_id for t in store.claim_held("dead", by="me")] == ["t2"]
    assert store.claim_held("dead", by="other") == []
    # Then they wait in our list, apart from what we hold ourselves, until we say they are back on a queue
    assert store.dead_holders() == []
    assert [t.task_id for t in store.held_by("me")] == ["t3"]
    assert [t.task_id for t in store.held_by("me", claimed=True)] == ["t2"]
    assert store.held_message_ids() == {"m1", "m2", "m3"}
    store.release("me", "t2")  # our own task t2 ending is another record
    assert [t.task_id for t in store.held_by("me", claimed=True)] == ["t2"]
    store.release("me", "t2", claimed=True)
    assert store.held_by("me", claimed=True) == [] and store.held_message_ids() == {"m1", "m3"}
    assert [t.task_id for t in store.held_by("alive")] == ["t1"]


def test_a_claimer_that_dies_hands_its_claimed_records_on(store):
    store.hold("first", held("t1", "m1"))
    store.claim_held("first", by="second")  # "second" never beats either: it died after claiming
    assert store.dead_holders() == ["second"]
    assert [t.task_id for t in store.claim_held("second", by="third")] == ["t1"]
    assert [t.task_id for t in store.held_by("third", claimed=True)] == ["t1"]  # claimed once, not twice


def test_a_worker_is_dead_once_its_heartbeat_expires():
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.heartbeat("w1", {"pid": 1}, ttl=15)
    store.hold("w1", held("t1", "m1"))
    clock.now += 14
    assert store.dead_holders() == [] and store.claim_held("w1", by="me") is None
    clock.now += 2
    assert store.dead_holders() == ["w1"]
    assert [t.task_id for t in store.claim_held("w1", by="me")] == ["t1"]


def test_dead_letters_newest_first(store):
    store.dead_letter({"payload": 1}, "first")
    store.dead_letter("garbage", "second")
    assert [d["reason"] for d in store.dead_letters()] == ["second", "first"]
    assert [d["reason"] for d in store.dead_letters(limit=1)] == ["second"]


def test_a_dead_letter_keeps_what_json_cannot_hold_as_its_repr(store):
    store.dead_letter({"body": b"\xff"}, "undecodable")
    assert store.dead_letters()[0]["payload"] == {"body": repr(b"\xff")}


def test_redis_away_raises_store_unavailable_after_bounded_retries():
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", retry_seconds=0.5)
    with pytest.raises(StoreUnavailable, match="did not answer"):
        store.create_turn("c1", "m1", "x")
    with pytest.raises(StoreUnavailable):
        store.get_conversation("c1")


# ----------------------------------------------------------------------------------------------- key names


def test_key_names_are_as_the_readme_documents():
    keys = Keys("p")
    assert (keys.conv("c1"), keys.turn("m1"), keys.deadletter()) == ("p:conv:c1", "p:turn:m1", "p:deadletter")
    assert (keys.worker("w1"), keys.pending(), keys.lock("sweep")) == ("p:worker:w1", "p:pending", "p:lock:sweep")
    assert keys.events("m1") == "p:events:m1"
    assert (keys.held("w1"), keys.holders()) == ("p:held:w1", "p:holders")
    assert (keys.worker.match, keys.everything) == ("p:worker:*", "p:*")
    assert keys.worker.id_of("p:worker:host:1") == "host:1"
    with pytest.raises(ValueError):
        keys.worker.id_of("q:worker:w1")
    with pytest.raises(TypeError):
        keys.turn()


def test_redis_store_writes_only_the_keys_it_declares():
    r = fakeredis.FakeRedis(decode_responses=True)
    store = RedisStore(r, prefix="p", ttl_seconds=120)
    keys = store.keys
    store.create_turn("c1", "m1", "x")
    store.heartbeat("w1", {"model": "m"}, ttl=10)
    store.dead_letter("garbage", "why")
    store.try_lock("sweep", ttl_seconds=10)
    store.hold("w1", held("t1", "m1"))
    expected = [keys.conv("c1"), keys.turn("m1"), keys.events("m1"), keys.pending(), keys.worker("w1"),
                keys.deadletter(), keys.lock("sweep"), keys.held("w1"), keys.holders()]
    assert sorted(r.keys("*")) == sorted(expected)
    assert r.lrange(keys.conv("c1"), 0, -1) == ["m1"]
    assert r.hget(keys.turn("m1"), "status") == "queued"
