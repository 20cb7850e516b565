"""Dead letters: task messages that could not be tied to a turn (malformed payloads), kept with the reason, newest
first, at most ``DEADLETTER_CAP``. One part of each store: ``RedisDeadLetters`` of :class:`RedisStore`,
``MemoryDeadLetters`` of :class:`MemoryStore`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import redis

from worker.store.base import StoreBase
from worker.store.connection import answering
from worker.store.keys import DEADLETTER_CAP, Keys


def _record(payload: Any, reason: str, at: float) -> str:
    # repr() for what JSON cannot hold: a malformed payload is kept as well as it can be, never refused.
    return json.dumps({"payload": payload, "reason": reason, "at": at}, default=repr)


class RedisDeadLetters(StoreBase):
    """Dead letters as a capped Redis list of JSON records (mixed into ``RedisStore``)."""

    r: redis.Redis
    keys: Keys

    def dead_letter(self, payload: Any, reason: str) -> None:
        record = _record(payload, reason, self._now())
        key = self.keys.deadletter()
        with answering():
            pipe = self.r.pipeline(transaction=True)
            pipe.lpush(key, record)
            pipe.ltrim(key, 0, DEADLETTER_CAP - 1)
            pipe.execute()

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with answering():
            return [json.loads(x) for x in self.r.lrange(self.keys.deadletter(), 0, limit - 1)]


class MemoryDeadLetters(StoreBase):
    """The same list in memory, records through the same JSON (mixed into ``MemoryStore``)."""

    _lock: threading.Lock

    def __init__(self) -> None:
        super().__init__()
        self._dead: list[dict[str, Any]] = []

    def dead_letter(self, payload: Any, reason: str) -> None:
        with self._lock:
            self._dead.insert(0, json.loads(_record(payload, reason, self._now())))
            del self._dead[DEADLETTER_CAP:]

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._dead[:limit])
