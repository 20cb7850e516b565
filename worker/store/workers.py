"""The worker side of the store: who is alive (heartbeats), who does a periodic chore (locks), and how long a
worker's queue is. One part of each store: ``RedisWorkers`` of :class:`RedisStore`, ``MemoryWorkers`` of
:class:`MemoryStore`, side by side so they stay alike.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import redis

from worker.store.base import StoreBase
from worker.store.connection import answering
from worker.store.keys import Keys


class RedisWorkers(StoreBase):
    """Heartbeats, locks and queue lengths in Redis (mixed into ``RedisStore``, which sets ``r`` and ``keys``)."""

    r: redis.Redis
    keys: Keys

    def heartbeat(self, worker: str, info: dict[str, Any], ttl: int) -> None:
        key = self.keys.worker(worker)
        with answering():
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(key, mapping={k: json.dumps(v) for k, v in info.items()})
            pipe.expire(key, ttl)
            pipe.execute()

    def workers(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with answering():
            for key in self.r.scan_iter(match=self.keys.worker.match, count=100):
                fields = self.r.hgetall(key)
                if fields:  # it may expire between SCAN and HGETALL
                    out[self.keys.worker.id_of(key)] = {k: json.loads(v) for k, v in fields.items()}
        return out

    def try_lock(self, name: str, ttl_seconds: int) -> bool:
        with answering():
            return bool(self.r.set(self.keys.lock(name), str(self._now()), nx=True, ex=ttl_seconds))

    def queue_length(self, queue: str) -> int:
        # Not one of our keys: kombu keeps a Celery queue as a Redis list named after the queue.
        with answering():
            return int(self.r.llen(queue))


class MemoryWorkers(StoreBase):
    """The same in one process's memory, on the store's clock (mixed into ``MemoryStore``, which sets ``_lock``)."""

    _lock: threading.Lock

    def __init__(self) -> None:
        super().__init__()
        self._workers: dict[str, tuple[float, dict[str, Any]]] = {}
        self._locks: dict[str, float] = {}

    def heartbeat(self, worker: str, info: dict[str, Any], ttl: int) -> None:
        with self._lock:
            # Through JSON, as Redis keeps it: a reader sees what it would see from Redis.
            self._workers[worker] = (self._now() + ttl, json.loads(json.dumps(info)))

    def _beating(self, worker: str) -> bool:
        """Whether the worker's heartbeat is live (the caller holds the store's lock)."""
        return worker in self._workers and self._workers[worker][0] > self._now()

    def workers(self) -> dict[str, dict[str, Any]]:
        now = self._now()
        with self._lock:
            return {w: info for w, (until, info) in self._workers.items() if until > now}

    def try_lock(self, name: str, ttl_seconds: int) -> bool:
        now = self._now()
        with self._lock:
            if self._locks.get(name, 0.0) > now:
                return False
            self._locks[name] = now + ttl_seconds
            return True

    def queue_length(self, queue: str) -> int:
        return 0  # no broker in memory: nothing waits
