"""Getting lost work back: a dead worker's task messages, and turns whose task message vanished.

Two ways work gets lost, two remedies, both run by every live worker's heartbeat thread (``worker.runtime``):

- **A worker dies holding messages** (kill -9, OOM, a lost machine). Each worker records what it holds
  (``worker.store.held``); when its heartbeat expires (``ALLINONE_HEARTBEAT_TTL_SECONDS``), a live worker, or the
  dead one's replacement as soon as its model is loaded, claims those records and puts the messages back at the
  head of their queue (:func:`reclaim`). A worker that is merely busy keeps beating and is never robbed.
  A worker records a message a moment after the broker recorded its delivery: one killed in that moment leaves a
  message the broker holds unacknowledged and no worker holds; it is put back after ``ORPHAN_AFTER_SECONDS``
  (:func:`put_back_orphans`). A live worker whose broker connection dropped holds records of messages Celery
  forgot; it releases them so they count as orphans (:func:`release_dropped`). Redis's own redelivery after the
  visibility timeout stays as the last resort.
- **A message vanishes before any worker recorded it**: Celery's Redis transport takes a message off the queue
  (BRPOP) before it records it as unacknowledged, so a worker killed between the two, or a Redis restart with the
  message in flight, loses it for good. The store still knows every unfinished turn submitted one by one (its
  pending index): one that no worker holds, no task touched for ``ALLINONE_STALE_AFTER_SECONDS`` and whose queue is
  empty is sent again (:func:`sweep_stale`).

Every step is idempotent, so a message put back or sent again that turns out to have been only slow, not lost, is
not answered twice.
"""

from __future__ import annotations

import logging
import time

from celery import Celery

from worker import contract
from worker.errors import PermanentError
from worker.schemas import HeldTask, parse_payload
from worker.settings import Settings
from worker.store import ResultsStore

log = logging.getLogger(__name__)

# How often a worker looks for dead workers' held messages: the crash-recovery bound is the heartbeat TTL plus this.
RECLAIM_SCAN_SECONDS = 1.0
# A message the broker delivered this long ago that no worker holds was taken by a worker that died before it could
# record it: far longer than the moment between the two records, far shorter than the heartbeat TTL.
ORPHAN_AFTER_SECONDS = 5.0
ORPHAN_SECOND_LOOK_SECONDS = 0.5
# A record of ours this old whose task Celery no longer has in memory was dropped by Celery (release_dropped): far
# longer than the moment between our record (task_received) and Celery's own.
DROPPED_AFTER_SECONDS = 5.0


def reclaim(store: ResultsStore, app: Celery, me: str) -> list[HeldTask]:
    """Put back what dead workers held; returns the records dealt with.

    Claimed records wait in this worker's own list until their message is back: records left by an earlier pass
    that failed half-way (Redis away) are finished first. A message the broker still holds unacknowledged goes
    back at the head of its queue, as it is; one it no longer holds (acknowledged, put back by the visibility
    timeout already, or lost with a Redis restart) is sent again through the contract if its turns are unfinished.
    """
    todo = store.held_by(me, claimed=True)
    for dead in store.dead_holders():
        if dead == me:  # our own heartbeat lapsed (Redis was away): we are alive, and beat again
            continue
        claimed = store.claim_held(dead, me)
        if claimed:
            log.warning("worker %s is gone (no heartbeat): putting back the %d task message(s) it held: %s",
                        dead, len(claimed), [t.task_id for t in claimed][:10])
            todo += claimed
    if not todo:
        return []
    # The oldest last: each goes to the head of its queue, so the oldest is taken first.
    todo.sort(key=lambda t: t.received_at, reverse=True)
    back = contract.put_back(app, [t.delivery_tag for t in todo if t.delivery_tag])
    for task in todo:
        if task.delivery_tag not in back:
            resend_unfinished(store, app, task)
        store.release(me, task.task_id, claimed=True)
    return todo


def put_back_orphans(store: ResultsStore, app: Celery, queues: list[str]) -> set[str]:
    """Put back what the broker holds unacknowledged for ``ORPHAN_AFTER_SECONDS`` that no worker holds; returns
    the delivery tags put back. Run after :func:`reclaim`, so a dead worker's own records are claimed first."""
    unacked = contract.unacknowledged(app, ORPHAN_AFTER_SECONDS, queues)
    held = store.held_task_ids() if unacked else set()
    suspects = {tag: task_id for tag, task_id in unacked.items() if task_id not in held}
    if not suspects:
        return set()
    # A second look: a task that just ended is released a moment before its message is acknowledged, and putting
    # that message back would run it again (harmless, but a retried reply would then wait twice).
    time.sleep(ORPHAN_SECOND_LOOK_SECONDS)
    held = store.held_task_ids()
    back = contract.put_back(app, [tag for tag, task_id in suspects.items() if task_id not in held])
    if back:
        log.warning("put back %d task message(s) taken by a worker that died before recording them: %s",
                    len(back), [unacked[tag] for tag in back][:10])
    return back


def resend_unfinished(store: ResultsStore, app: Celery, task: HeldTask) -> list[str]:
    """Send the task's unfinished turns again, through the contract, on the task's queue; returns their ids."""
    payloads = []
    for raw in task.payloads:
        try:
            payloads.append(parse_payload(raw))
        except PermanentError:
            continue  # a poison payload: its task dead-lettered it, or will
    statuses = store.get_statuses([p.message_id for p in payloads])
    todo = [p for p, s in zip(payloads, statuses, strict=True) if s is not None and not s.terminal]
    if not todo:
        return []
    if task.task == contract.CLASSIFY_BATCH:
        contract.send_batches(app, [[p.model_dump() for p in todo]], task.queue, reply=task.reply)
    else:
        for p in todo:
            contract.send_turn(app, p.message_id, p.conversation_id, task.queue)
    for p in todo:
        store.mark_working(p.message_id)  # just sent: not stale
    log.warning("sent again %d unfinished turn(s) of task %s: %s", len(todo), task.task_id,
                [p.message_id for p in todo][:10])
    return [p.message_id for p in todo]


def sweep_interval(settings: Settings) -> float:
    """How often the stale sweep runs: often enough to notice within half the staleness bound, at most 15 s."""
    return max(1.0, min(15.0, settings.stale_after_seconds / 2))


def sweep_stale(
    store: ResultsStore, app: Celery, stale_after_seconds: float, default_queue: str, limit: int = 100
) -> list[str]:
    """Re-enqueue unfinished turns that no worker holds and no task has touched for ``stale_after_seconds``, when
    their queue is empty; returns their ids."""
    stale = store.stale_turns(stale_after_seconds, limit=limit)
    held = store.held_message_ids() if stale else set()
    sent = []
    for mid in stale:
        if mid in held:
            continue  # a worker has its message (running it, or waiting for an earlier turn): not lost
        (turn,) = store.get_turns([mid])
        if turn is None or turn.status.terminal:
            store.drop_pending(mid)
            continue
        queue = turn.queue or default_queue
        if store.queue_length(queue):
            # A backlog: the turn's message may simply be waiting in it. Only an empty queue tells "lost" apart
            # from "not yet taken"; try again at a later sweep.
            continue
        contract.send_turn(app, turn.message_id, turn.conversation_id, queue)
        store.mark_working(mid)
        sent.append(mid)
    if sent:
        log.warning("re-enqueued %d turn(s) whose task was lost: %s", len(sent), sent[:10])
    return sent


def release_dropped(store: ResultsStore, me: str, kept: set[str], now: float | None = None) -> list[str]:
    """Drop this live worker's records of task messages Celery no longer has (``kept``: the ids it still holds in
    memory, received or waiting for their countdown); returns their ids.

    When the broker connection drops, Celery forgets what it received but did not run (``Consumer.on_close``), for
    the broker to deliver again; kombu's restore at close needs Redis, and while Redis is down the messages stay in
    its unacknowledged set. Our records of them would then keep :func:`put_back_orphans` off them (a worker holds
    them) and :func:`reclaim` too (that worker is alive): they came back only after the visibility timeout, and
    their conversations waited as long (seen in the chaos run). Released, they are orphans and go back in seconds."""
    now = time.time() if now is None else now
    gone = [t.task_id for t in store.held_by(me)
            if t.task_id not in kept and now - t.received_at > DROPPED_AFTER_SECONDS]
    for task_id in gone:
        store.release(me, task_id)
    if gone:
        log.warning("released %d held record(s) of task messages the worker no longer has (a lost broker "
                    "connection): %s", len(gone), gone[:10])
    return gone


def recover(store: ResultsStore, app: Celery, me: str, settings: Settings) -> None:
    """One pass of the heartbeat thread: a dead worker's messages, then the messages no worker holds (one worker at
    a time: a lock that expires by itself)."""
    reclaim(store, app, me)
    if store.try_lock("orphans", ttl_seconds=max(1, int(RECLAIM_SCAN_SECONDS))):
        put_back_orphans(store, app, [settings.live_queue, settings.bulk_queue])


def sweep(store: ResultsStore, app: Celery, settings: Settings) -> list[str]:
    """One sweep, by one worker at a time (a lock that expires by itself); nothing when the sweep is off."""
    if not settings.stale_after_seconds:
        return []
    if not store.try_lock("sweep", ttl_seconds=max(1, int(sweep_interval(settings)))):
        return []
    return sweep_stale(store, app, settings.stale_after_seconds, settings.live_queue)
