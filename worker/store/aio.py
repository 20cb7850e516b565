"""The results store for asyncio code (the web app, ``producer.AsyncProducer``): what a producer needs, on
``redis.asyncio``, so an event loop never waits on a socket.

The same keys, encoding and Lua scripts as :class:`~worker.store.RedisStore` (``worker.store.keys``, ``codec``,
``scripts``, ``events``): a turn created here is the turn the blocking store creates. Only the retry policy
differs: a web request must fail fast while Redis is away (one immediate retry, for a pooled connection that went
stale; then :class:`StoreUnavailable`) and let its client retry, not hold the request for the blocking store's
``ALLINONE_REDIS_RETRY_SECONDS``.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.errors import MessageIdConflict, UnknownConversation
from worker.events import Event
from worker.schemas import Conversation, Turn
from worker.store import scripts
from worker.store.base import unknown_message
from worker.store.codec import turn_from_fields
from worker.store.connection import answering
from worker.store.events import READ_COUNT, block_ms, parse_xread
from worker.store.keys import Keys

# A blocking read waits at most this long per call (callers loop), well inside the socket timeout below.
MAX_BLOCK_SECONDS = 5.0
# Each follower of a stream holds a connection while its read blocks: the pool allows as many as a Redis accepts
# by default (maxclients), not redis-py's default of 100, which would refuse the 101st follower.
MAX_CONNECTIONS = 10_000
_SOCKET_TIMEOUT = 10.0
# Generous: a Redis that is down refuses at once (that is the fast 503); this only bounds a host that does not
# answer, and a busy event loop accepting a burst of connections must not mistake itself for an outage.
_CONNECT_TIMEOUT = 5.0


def connect_async(url: str, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """An asyncio client that fails fast: one immediate retry on a dropped connection, then the error."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=_SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        max_connections=max_connections,
    )


class AsyncRedisStore:
    """Turns, conversations and event streams in Redis, for asyncio producers and readers."""

    def __init__(self, client: aioredis.Redis, prefix: str = "allinone", ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.keys = Keys(prefix)
        self.ttl = ttl_seconds
        self._create_script = client.register_script(scripts.CREATE_LUA)
        self._enqueued_script = client.register_script(scripts.ENQUEUED_LUA)

    @classmethod
    def from_settings(cls, settings: Any, max_connections: int = MAX_CONNECTIONS) -> AsyncRedisStore:
        client = connect_async(settings.redis_url, max_connections=max_connections)
        return cls(client, prefix=settings.key_prefix, ttl_seconds=settings.result_ttl_seconds)

    async def aclose(self) -> None:
        await self.r.aclose()

    # writes -----------------------------------------------------------------------------------------------------
    async def create_turn(
        self, conversation_id: str, message_id: str, text: str, queue: str | None = None
    ) -> tuple[Turn, bool]:
        """As ``RedisStore.create_turn``: the same script, so the same turn, seq, index entry and ``queued`` event."""
        turn = Turn(message_id=message_id, conversation_id=conversation_id, seq=0, text=text, queue=queue)
        keys, args = scripts.create_call(self.keys, self.ttl, turn, pending_score=turn.created_at, queued_event=True)
        with answering():
            result = scripts.created(turn, await self._create_script(keys=keys, args=args))
        if isinstance(result, MessageIdConflict):
            raise result
        return result

    async def mark_enqueued(self, message_id: str) -> None:
        with answering():
            await self._enqueued_script(keys=[self.keys.turn(message_id)], args=[str(time.time())])

    # reads ----------------------------------------------------------------------------------------------------
    async def get_turn(self, message_id: str) -> Turn:
        with answering():
            fields = await self.r.hgetall(self.keys.turn(message_id))
        if not fields:
            raise unknown_message(message_id)
        return turn_from_fields(fields)

    async def get_conversation(self, conversation_id: str) -> Conversation:
        with answering():
            ids = await self.r.lrange(self.keys.conv(conversation_id), 0, -1)
            if not ids:
                raise UnknownConversation(f"no conversation {conversation_id!r} (never submitted to, or expired)")
            pipe = self.r.pipeline(transaction=False)
            for mid in ids:
                pipe.hgetall(self.keys.turn(mid))
            rows = await pipe.execute()
        return Conversation(conversation_id=conversation_id, turns=[turn_from_fields(f) for f in rows if f])

    async def read_events(
        self, message_id: str, after: str = "0", block: float | None = None, count: int = READ_COUNT
    ) -> list[Event]:
        """As ``RedisStore.read_events``; a wait is cut to :data:`MAX_BLOCK_SECONDS` (callers loop)."""
        wait = None if block is None else min(block, MAX_BLOCK_SECONDS)
        with answering():
            reply = await self.r.xread({self.keys.events(message_id): after}, count=count, block=block_ms(wait))
        return parse_xread(reply)

    async def ping(self) -> bool:
        with answering():
            return bool(await self.r.ping())
