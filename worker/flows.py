"""How a turn's work is put on the queue: one place, used by the producer and by the worker's stale sweep.

Only Celery primitives (``chain`` of ``Signature``s by task name), so sending never imports the tasks (or torch).
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.canvas import Signature, chain

from worker.schemas import TaskPayload
from worker.store import ResultsStore

log = logging.getLogger(__name__)


def send_turn(app: Celery, message_id: str, conversation_id: str, queue: str) -> None:
    """Sentiment, then (chained: sent by the worker when the first succeeds) the reply, on ``queue``."""
    payload = TaskPayload(message_id=message_id, conversation_id=conversation_id).model_dump()
    chain(
        Signature("allinone.classify", args=(payload,), app=app, queue=queue),
        Signature("allinone.reply", app=app, queue=queue),
    ).apply_async()


def send_replies(app: Celery, payloads: list[TaskPayload], queue: str) -> None:
    """One ``allinone.reply`` per payload on ``queue``, on one producer connection (a bulk batch's replies)."""
    if not payloads:
        return
    with app.producer_or_acquire() as producer:
        for p in payloads:
            app.send_task("allinone.reply", args=(p.model_dump(),), queue=queue, producer=producer,
                          argsrepr=p.message_id, kwargsrepr="{}")


def sweep_stale(
    store: ResultsStore, app: Celery, stale_after_seconds: float, default_queue: str, limit: int = 100
) -> list[str]:
    """Re-enqueue unfinished turns that no task has touched for ``stale_after_seconds``; returns their ids.

    Why: Celery's Redis transport takes a message off the queue (BRPOP) before it records it as unacknowledged,
    so a worker killed between the two, or a Redis restart with the reply in flight, loses that message for good.
    The store still knows the turn, so it can be sent again; every step is idempotent, so a turn whose task was
    only slow, not lost, is not answered twice.
    """
    sent = []
    for mid in store.stale(stale_after_seconds, limit=limit):
        (turn,) = store.get_turns([mid])
        if turn is None or turn.status.terminal:
            store.unpend(mid)
            continue
        queue = turn.queue or default_queue
        if store.queue_length(queue):
            # A backlog: the turn's message may simply be waiting in it. Only an empty queue tells "lost" apart
            # from "not yet taken"; try again at a later sweep.
            continue
        send_turn(app, turn.message_id, turn.conversation_id, queue)
        store.touch(mid)
        sent.append(mid)
    if sent:
        log.warning("re-enqueued %d turn(s) whose task was lost: %s", len(sent), sent[:10])
    return sent
