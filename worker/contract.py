"""The contract between producers and workers: the task names, what their messages carry, and how a turn's work is
put on a queue. The producer, the bulk command and the worker's own recovery all send through these functions,
and a dead worker's messages are found (:func:`unacknowledged`) and put back on their queue (:func:`put_back`).

Only Celery primitives (``chain`` of ``Signature``s by task name), so sending never imports the tasks (or torch).
A message carries a :class:`~worker.schemas.TaskPayload` as plain JSON (``{"message_id", "conversation_id"}``);
the text stays in the results store. Queue names are settings (``ALLINONE_LIVE_QUEUE``, ``ALLINONE_BULK_QUEUE``).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from celery import Celery
from celery.canvas import Signature, chain
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from worker.schemas import TaskPayload

# The task names: what a producer sends and what a worker registers (worker.tasks).
CLASSIFY = "allinone.classify"  # sentiment of one turn; chained to REPLY
REPLY = "allinone.reply"  # the chat reply of one turn, seeing the turns before it
CLASSIFY_BATCH = "allinone.classify_batch"  # sentiment of many turns in batched forward passes (bulk jobs)
TASKS = (CLASSIFY, REPLY, CLASSIFY_BATCH)


def send_turn(app: Celery, message_id: str, conversation_id: str, queue: str) -> None:
    """Sentiment, then (chained: sent by the worker when the first succeeds) the reply, on ``queue``."""
    payload = TaskPayload(message_id=message_id, conversation_id=conversation_id).model_dump()
    chain(
        Signature(CLASSIFY, args=(payload,), app=app, queue=queue),
        Signature(REPLY, app=app, queue=queue),
    ).apply_async()


def send_replies(app: Celery, payloads: Sequence[TaskPayload], queue: str) -> None:
    """One ``REPLY`` per payload on ``queue``, on one producer connection (a bulk batch's replies)."""
    if not payloads:
        return
    with app.producer_or_acquire() as producer:
        for p in payloads:
            app.send_task(REPLY, args=(p.model_dump(),), queue=queue, producer=producer,
                          argsrepr=p.message_id, kwargsrepr="{}")


def send_batches(app: Celery, batches: Iterable[list[dict[str, Any]]], queue: str, reply: bool = False,
                 max_batch: int = 2000) -> None:
    """One ``CLASSIFY_BATCH`` per list of payloads, all in one Redis pipeline (kombu's publish batch).

    With ``reply`` the worker sends each classified turn's ``REPLY`` itself. The keyword argument is only sent
    when true: a message without it is what workers before it understood."""
    kwargs = {"reply": True} if reply else {}
    with app.producer_or_acquire() as producer, producer.batch(max_size=max_batch):
        for b in batches:
            app.send_task(CLASSIFY_BATCH, args=(b,), kwargs=kwargs, queue=queue, producer=producer,
                          argsrepr=f"[{len(b)} payloads]", kwargsrepr=repr(kwargs))


def put_back(app: Celery, delivery_tags: Sequence[str]) -> set[str]:
    """Put messages a dead worker held unacknowledged back at the head of their queue, now; returns the tags put
    back (the others the broker no longer holds unacknowledged: acknowledged, or put back already).

    This is the broker's own restore (kombu's, which its visibility-timeout sweep runs), done when the holder is
    known dead instead of when the timeout expires, as RabbitMQ requeues a consumer's messages the moment its
    connection drops: the same message (task id, chain, countdown), at the head of the queue since it is older
    than anything waiting, and not redelivered again later. Only the Redis transport keeps unacknowledged
    messages where another process can reach them; with any other, nothing is put back.
    """
    if not delivery_tags:
        return set()
    back: set[str] = set()
    with app.pool.acquire(block=True) as conn:
        channel = conn.default_channel
        unacked = getattr(channel, "unacked_key", None)
        if unacked is None:
            return back
        # Declared as every publish does, so the restore finds the queue bound to the message's exchange: kombu
        # drops a restored message whose exchange has no binding.
        for queue in app.amqp.queues.values():
            queue(channel).declare()
        client = channel.client
        for tag in delivery_tags:
            if client.hexists(unacked, tag):
                channel.qos.restore_by_tag(tag, client=client)
                back.add(tag)
    return back


def unacknowledged(
    app: Celery, older_than_seconds: float, queues: Collection[str], limit: int = 1000
) -> dict[str, str]:
    """Our task messages on ``queues`` that a worker took more than ``older_than_seconds`` ago and has not
    acknowledged: delivery tag -> task id (Redis transport only; empty with any other).

    A worker records what it holds a moment after the broker recorded the delivery; one killed in that moment
    leaves a message the broker holds that no worker says it holds (``worker.recovery``). Messages of other task
    names or queues (another application sharing the Redis database) are never ours to put back.
    """
    with app.pool.acquire(block=True) as conn:
        channel = conn.default_channel
        index = getattr(channel, "unacked_index_key", None)
        if index is None:
            return {}
        client = channel.client
        tags = [bytes_to_str(t) for t in client.zrangebyscore(
            index, "-inf", time.time() - older_than_seconds, start=0, num=limit)]
        rows = client.hmget(channel.unacked_key, tags) if tags else []
    found: dict[str, str] = {}
    for tag, raw in zip(tags, rows, strict=True):
        try:
            message, _exchange, routing_key = loads(bytes_to_str(raw))
            headers = message["headers"]
        except (TypeError, ValueError, KeyError):
            continue  # acknowledged meanwhile, or not a message kombu wrote
        if routing_key in queues and headers.get("task") in TASKS and isinstance(headers.get("id"), str):
            found[tag] = headers["id"]
    return found
