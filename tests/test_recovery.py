"""The sweep that re-sends turns whose task was lost."""

from __future__ import annotations

import pytest
from celery import Celery
from test_producer import queued

from worker.recovery import sweep_stale
from worker.schemas import Sentiment
from worker.store import MemoryStore
from worker.testing import ManualClock


@pytest.fixture()
def app():
    a = Celery("test-recovery", broker="memory://")
    a.conf.task_serializer = "json"
    queued(a, "live")  # the in-memory broker is shared by the whole process: start from an empty queue
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
