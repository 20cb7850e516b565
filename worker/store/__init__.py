"""The results store, keyed by conversation id: a Redis implementation and an in-memory stand-in.

What lives where:

- ``keys``: every Redis key name, with its type and content (the README's "Redis key layout" table is generated
  from it: ``python -m worker.store``).
- ``base``: ``ResultsStore``, the protocol every caller codes against, and the status transitions both stores
  share (forward only, first writer wins).
- ``codec``: a turn as a flat hash of strings, both ways.
- ``redis``: ``RedisStore``: turns, conversations, the pending index, the bulk calls.
- ``scripts``: the Lua scripts (creating a turn, marking it enqueued, starting a reply attempt) and their
  arguments, shared by the blocking and the asyncio store.
- ``memory``: ``MemoryStore``, the same in memory, on an injected clock.
- ``events``: a turn's event stream: reading it (blocking), token events, a reply attempt's ``restart`` (a Redis
  part and a memory part; what the events mean: ``worker.events``).
- ``aio``: ``AsyncRedisStore``, what asyncio producers need (create, read, follow) on ``redis.asyncio``.
- ``workers``: the worker side: heartbeats, locks, queue length (a Redis part and a memory part).
- ``held``: who holds what: each worker's held task messages, claimed by a live worker when it dies.
- ``deadletters``: task messages that could not be processed (a Redis part and a memory part).
- ``connection``: the Redis client's retry policy, and Redis errors as ``StoreUnavailable``.

This package must stay importable without torch: the producer uses it.
"""

from __future__ import annotations

from typing import Any

from worker.store.base import ResultsStore
from worker.store.keys import Keys
from worker.store.memory import MemoryStore
from worker.store.redis import RedisStore

__all__ = ["Keys", "MemoryStore", "RedisStore", "ResultsStore", "store_from_settings"]


def store_from_settings(settings: Any = None) -> RedisStore:
    """The Redis store the settings point at."""
    from worker.settings import get_settings

    s = settings or get_settings()
    return RedisStore.from_url(
        s.redis_url, prefix=s.key_prefix, ttl_seconds=s.result_ttl_seconds, retry_seconds=s.redis_retry_seconds
    )
