"""Getting lost work back: turns whose task message vanished are put on their queue again.

Why: Celery's Redis transport takes a message off the queue (BRPOP) before it records it as unacknowledged, so a
worker killed between the two, or a Redis restart with the message in flight, loses that message for good. The
store still knows every unfinished turn submitted one by one (its pending index), so the turn can be sent again;
every step is idempotent, so a turn whose task was only slow, not lost, is not answered twice.
"""

from __future__ import annotations

import logging

from celery import Celery

from worker.contract import send_turn
from worker.settings import Settings
from worker.store import ResultsStore

log = logging.getLogger(__name__)


def sweep_interval(settings: Settings) -> float:
    """How often the stale sweep runs: often enough to notice within half the staleness bound, at most 15 s."""
    return max(1.0, min(15.0, settings.stale_after_seconds / 2))


def sweep_stale(
    store: ResultsStore, app: Celery, stale_after_seconds: float, default_queue: str, limit: int = 100
) -> list[str]:
    """Re-enqueue unfinished turns that no task has worked on for ``stale_after_seconds``; returns their ids."""
    sent = []
    for mid in store.stale_turns(stale_after_seconds, limit=limit):
        (turn,) = store.get_turns([mid])
        if turn is None or turn.status.terminal:
            store.drop_pending(mid)
            continue
        queue = turn.queue or default_queue
        if store.queue_length(queue):
            # A backlog: the turn's message may simply be waiting in it. Only an empty queue tells "lost" apart
            # from "not yet taken"; try again at a later sweep.
            continue
        send_turn(app, turn.message_id, turn.conversation_id, queue)
        store.mark_working(mid)
        sent.append(mid)
    if sent:
        log.warning("re-enqueued %d turn(s) whose task was lost: %s", len(sent), sent[:10])
    return sent


def sweep(store: ResultsStore, app: Celery, settings: Settings) -> list[str]:
    """One sweep, by one worker at a time (a lock that expires by itself); nothing when the sweep is off."""
    if not settings.stale_after_seconds:
        return []
    if not store.try_lock("sweep", ttl_seconds=max(1, int(sweep_interval(settings)))):
        return []
    return sweep_stale(store, app, settings.stale_after_seconds, settings.live_queue)
