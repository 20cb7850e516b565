"""Getting lost work back: a dead worker's held messages, and the sweep that re-sends turns whose task was lost."""

from __future__ import annotations

import pytest
import redis
from celery import Celery
from test_producer import queued

from producer.client import make_celery
from worker import contract, recovery
from worker.errors import StoreUnavailable
from worker.recovery import put_back_orphans, reclaim, sweep_stale
from worker.schemas import HeldTask, Sentiment
from worker.settings import Settings
from worker.store import MemoryStore, RedisStore
from worker.testing import ManualClock


@pytest.fixture()
def app():
    a = Celery("test-recovery", broker="memory://")
    a.conf.task_serializer = "json"
    for queue in ("live", "bulk"):  # the in-memory broker is shared by the whole process: start from empty queues
        queued(a, queue)
    return a


def test_sweep_resends_only_unfinished_turns_nobody_touched(app):
    clock = ManualClock()
    store = MemoryStore(ttl_seconds=60, clock=clock)
    store.create_turn("c", "ghost", "a turn that will expire meanwhile")
    clock.now += 40
    store.create_turn("c", "lost", "a message whose task vanished", queue="live")
    clock.now += 35  # the ghost has expired; nobody touched the lost one for 35 s
    store.create_turn("c", "done", "finished")
    store.mark_done("done", "ok", "m")
    store.create_turn("c", "fresh", "just touched")

    sent = sweep_stale(store, app, stale_after_seconds=30, default_queue="live")

    assert sent == ["lost"]
    assert [m["args"][0]["message_id"] for m in queued(app, "live")] == ["lost"]
    assert sorted(store.stale_turns(older_than_seconds=-1)) == ["fresh", "lost"]  # the ghost left the index
    clock.now += 5
    assert store.stale_turns(older_than_seconds=30) == []  # touched: not sent again on the next sweep
    assert sweep_stale(store, app, stale_after_seconds=30, default_queue="live") == []


def test_a_turn_being_worked_on_is_never_stale(app):
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.create_turn("c", "m1", "x")
    clock.now += 100
    store.mark_classified("m1", Sentiment(label="positive", confidence=0.9), "m")  # a task just touched it
    assert sweep_stale(store, app, stale_after_seconds=30, default_queue="live") == []


def test_no_resend_while_the_queue_has_a_backlog(app):
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.create_turn("c", "m1", "x")
    clock.now += 100
    store.queue_length = lambda queue: 250  # its message may still be waiting in there
    assert sweep_stale(store, app, stale_after_seconds=30, default_queue="live") == []
    assert queued(app, "live") == []


# ---------------------------------------------------------------------------------------- a dead worker's work


def held(task_id: str, task: str, *message_ids: str, reply: bool = False, queue: str = "live") -> HeldTask:
    return HeldTask(task_id=task_id, task=task, delivery_tag=f"tag-{task_id}", queue=queue,
                    payloads=[{"message_id": m, "conversation_id": "c"} for m in message_ids], reply=reply,
                    received_at=1.0)


def test_a_dead_workers_unfinished_turns_are_sent_again_and_its_list_emptied(app):
    # Given a worker that died holding a reply of an unfinished turn and one of a turn finished just before death
    # (the in-memory broker keeps nothing unacknowledged, so nothing can be put back as it was)
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.create_turn("c", "open", "its worker died mid-reply", queue="live")
    store.create_turn("c", "finished", "done just before the kill")
    store.mark_done("finished", "ok", "m")
    store.heartbeat("dead", {"pid": 1}, ttl=15)
    store.hold("dead", held("t1", contract.REPLY, "open"))
    store.hold("dead", held("t2", contract.REPLY, "finished"))
    store.heartbeat("me", {"pid": 2}, ttl=15)
    # When its heartbeat expires and we look
    clock.now += 16
    store.heartbeat("me", {"pid": 2}, ttl=15)
    back = reclaim(store, app, "me")
    # Then only the unfinished turn is sent again, and nobody holds anything any more
    assert sorted(t.task_id for t in back) == ["t1", "t2"]
    (msg,) = queued(app, "live")
    assert msg["task"] == contract.CLASSIFY and msg["args"] == [{"message_id": "open", "conversation_id": "c"}]
    assert store.held_message_ids() == set() and store.dead_holders() == []
    assert reclaim(store, app, "me") == []


def test_a_live_worker_is_never_robbed_however_long_its_task(app):
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.create_turn("c", "m1", "a long reply")
    store.hold("busy", held("t1", contract.REPLY, "m1"))
    for _ in range(20):  # a reply far longer than the heartbeat TTL, its worker beating all along
        store.heartbeat("busy", {"pid": 1}, ttl=15)
        clock.now += 5
        assert reclaim(store, app, "me") == []
    assert queued(app, "live") == [] and store.held_message_ids() == {"m1"}


def test_a_dead_workers_bulk_batch_comes_back_as_one_batch_of_its_unfinished_turns(app):
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.create_turns([("c", f"b{i}", f"row {i}") for i in range(3)], queue="bulk")
    store.mark_done("b0", "", "m")
    store.hold("dead", held("t1", contract.CLASSIFY_BATCH, "b0", "b1", "b2", reply=True, queue="bulk"))
    reclaim(store, app, "me")
    (msg,) = queued(app, "bulk")
    assert msg["task"] == contract.CLASSIFY_BATCH and msg["kwargs"] == {"reply": True}
    assert [p["message_id"] for p in msg["args"][0]] == ["b1", "b2"]


def test_records_claimed_by_a_pass_that_failed_are_finished_by_the_next(app, monkeypatch):
    store = MemoryStore(clock=ManualClock())
    store.create_turn("c", "m1", "x", queue="live")
    store.hold("dead", held("t1", contract.REPLY, "m1"))

    def redis_away(*_):
        raise StoreUnavailable("Redis did not answer")

    monkeypatch.setattr(contract, "put_back", redis_away)
    with pytest.raises(StoreUnavailable):
        reclaim(store, app, "me")
    assert [t.task_id for t in store.held_by("me", claimed=True)] == ["t1"]  # claimed, not yet back
    monkeypatch.undo()
    assert [t.task_id for t in reclaim(store, app, "me")] == ["t1"]
    assert [m["args"][0]["message_id"] for m in queued(app, "live")] == ["m1"]
    assert store.held_by("me", claimed=True) == []


def test_the_sweep_leaves_alone_a_turn_a_worker_holds(app):
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    store.create_turn("c", "waiting", "a reply held until its countdown is due", queue="live")
    store.create_turn("c", "lost", "nobody has its message", queue="live")
    store.heartbeat("w1", {"pid": 1}, ttl=15)
    store.hold("w1", held("t1", contract.REPLY, "waiting"))
    clock.now += 100
    assert sweep_stale(store, app, stale_after_seconds=30, default_queue="live") == ["lost"]


def delivered(app: Celery, conn, *message_ids: str) -> list:
    """Turns sent to the live queue and taken off it through ``conn`` without an acknowledgement, so the broker
    holds them unacknowledged while ``conn`` is open; the messages in the order of ``message_ids``."""
    for mid in message_ids:
        contract.send_turn(app, mid, "c", "live")
    taken = [conn.channel().basic_get("live", no_ack=False) for _ in message_ids]
    by_id = {m.decode()[0][0]["message_id"]: m for m in taken}
    return [by_id[mid] for mid in message_ids]


def hold_delivery(store: RedisStore, worker: str, msg, received_at: float) -> None:
    """``worker``'s record of holding the delivered message ``msg``."""
    store.hold(worker, HeldTask(task_id=msg.headers["id"], task=contract.CLASSIFY, queue="live",
                                delivery_tag=msg.delivery_tag, payloads=[], received_at=received_at))


@pytest.mark.integration
def test_a_message_taken_by_a_worker_that_died_before_recording_it_is_put_back(redis_url, monkeypatch):
    # Given two messages the broker delivered and holds unacknowledged: one a worker holds, one nobody holds (its
    # worker died between the broker's record and its own)
    app = make_celery(Settings(redis_url=redis_url))
    store = RedisStore(redis.Redis.from_url(redis_url, decode_responses=True))
    r = redis.Redis.from_url(redis_url)
    with app.connection_for_read() as conn:
        held_msg, orphan = delivered(app, conn, "m-held", "m-orphan")
        hold_delivery(store, "w1", held_msg, received_at=0.0)
        # When a worker looks, once they are older than the moment a worker needs to record what it took
        assert put_back_orphans(store, app, ["live"]) == set()  # too recent: its worker may be recording it
        monkeypatch.setattr(recovery, "ORPHAN_AFTER_SECONDS", 0.0)
        monkeypatch.setattr(recovery, "ORPHAN_SECOND_LOOK_SECONDS", 0.0)
        back = put_back_orphans(store, app, ["live"])
        # Then only the one nobody holds is back on its queue; messages of other queues are not ours
        assert back == {orphan.delivery_tag}
        assert r.llen("live") == 1 and r.hexists("unacked", held_msg.delivery_tag)
        assert put_back_orphans(store, app, ["bulk"]) == set()


@pytest.mark.integration
def test_a_task_that_just_ended_is_not_put_back_on_its_way_to_the_acknowledgement(redis_url, monkeypatch):
    # Given a message whose task has just ended: released by its worker, its acknowledgement a moment away
    app = make_celery(Settings(redis_url=redis_url))
    store = RedisStore(redis.Redis.from_url(redis_url, decode_responses=True))
    contract.send_turn(app, "m1", "c", "live")
    monkeypatch.setattr(recovery, "ORPHAN_AFTER_SECONDS", 0.0)
    with app.connection_for_read() as conn:
        msg = conn.channel().basic_get("live", no_ack=False)
        # When a worker looks in between, and the acknowledgement lands during its second look
        monkeypatch.setattr(recovery.time, "sleep", lambda _: msg.ack())
        # Then it is not put back: nothing would run it a second time
        assert put_back_orphans(store, app, ["live"]) == set()
        assert redis.Redis.from_url(redis_url).llen("live") == 0


def test_records_of_messages_a_live_worker_dropped_are_released_and_the_messages_put_back(redis_url, monkeypatch):
    # Given two messages the broker delivered and holds unacknowledged, both recorded by one live worker, and that
    # worker's Celery, after its broker connection dropped while Redis was down, keeps only one of them in memory
    # (the other was forgotten by Consumer.on_close, and kombu's restore at close could not reach Redis)
    app = make_celery(Settings(redis_url=redis_url))
    store = RedisStore(redis.Redis.from_url(redis_url, decode_responses=True))
    store.heartbeat("w1", {"pid": 1}, ttl=15)  # alive: reclaim leaves its records alone
    r = redis.Redis.from_url(redis_url)
    with app.connection_for_read() as conn:
        kept, dropped = delivered(app, conn, "m-kept", "m-dropped")
        for msg in (kept, dropped):
            hold_delivery(store, "w1", msg, received_at=100.0)
        monkeypatch.setattr(recovery, "ORPHAN_AFTER_SECONDS", 0.0)
        monkeypatch.setattr(recovery, "ORPHAN_SECOND_LOOK_SECONDS", 0.0)
        assert put_back_orphans(store, app, ["live"]) == set()  # held: nobody may put them back
        in_memory = {kept.headers["id"]}
        # When the worker compares its records with what Celery holds: not before a record has had time to become
        # Celery's own request too
        assert recovery.release_dropped(store, "w1", in_memory, now=100.0 + recovery.DROPPED_AFTER_SECONDS) == []
        gone = recovery.release_dropped(store, "w1", in_memory, now=101.0 + recovery.DROPPED_AFTER_SECONDS)
        # Then only the dropped one's record goes, and the next look puts its message back on its queue
        assert gone == [dropped.headers["id"]]
        assert [t.task_id for t in store.held_by("w1")] == [kept.headers["id"]]
        assert put_back_orphans(store, app, ["live"]) == {dropped.delivery_tag}
        assert r.llen("live") == 1 and r.hexists("unacked", kept.delivery_tag)


def test_the_worker_reads_the_tasks_celery_holds_in_memory(monkeypatch):
    # The solo pool keeps received and countdown-waiting requests in this process; any other pool keeps them in
    # another, where nothing can be compared (and nothing is released).
    from celery.worker import state

    from worker import runtime
    from worker.app import app as worker_app

    class Req:
        def __init__(self, id: str) -> None:
            self.id = id

    waiting = Req("t-countdown")
    monkeypatch.setattr(state, "requests", {"t-running": Req("t-running")})
    monkeypatch.setattr(state, "scheduled_requests", {waiting})
    assert runtime._tasks_in_memory() == {"t-running", "t-countdown"}
    monkeypatch.setitem(worker_app.conf, "worker_pool", "prefork")
    assert runtime._tasks_in_memory() is None
