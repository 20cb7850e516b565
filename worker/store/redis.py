"""The results store in Redis: turns, conversations and the pending index (key names: ``worker.store.keys``).

Every write refreshes the TTL of the turn, of its conversation and of its event stream, so a conversation lives
``ttl_seconds`` after its last activity. Message ids are global: the same id submitted twice is one turn
(idempotency), whichever process submits it. Each status change appends its event to the turn's stream in the same
transaction. Event streams (reads, tokens), the worker side (heartbeats, locks, queue length), the held task
messages and dead letters are parts mixed in from ``worker.store.events``, ``worker.store.workers``,
``worker.store.held`` and ``worker.store.deadletters``; the Lua scripts of turns live in ``worker.store.scripts``.
"""

from __future__ import annotations

from typing import Any

import redis

from worker import events
from worker.errors import MessageIdConflict, UnknownConversation
from worker.schemas import Conversation, Status, Turn
from worker.store import scripts
from worker.store.base import TurnWrites, unknown_message
from worker.store.codec import turn_from_fields
from worker.store.connection import answering, connect
from worker.store.deadletters import RedisDeadLetters
from worker.store.events import RedisEvents
from worker.store.held import CLAIM_LUA, RedisHeld
from worker.store.keys import Keys
from worker.store.workers import RedisWorkers


class RedisStore(RedisEvents, RedisDeadLetters, RedisHeld, RedisWorkers, TurnWrites):
    """The results store in Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "allinone", ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.keys = Keys(prefix)
        self.ttl = ttl_seconds
        self._create_script = client.register_script(scripts.CREATE_LUA)
        self._enqueued_script = client.register_script(scripts.ENQUEUED_LUA)
        self._begin_reply_script = client.register_script(scripts.BEGIN_REPLY_LUA)
        self._claim_script = client.register_script(CLAIM_LUA)

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "allinone", ttl_seconds: int = 7 * 24 * 3600, retry_seconds: float = 10.0
    ) -> RedisStore:
        """A store whose client retries a Redis that went away, with exponential backoff, for about
        ``retry_seconds`` in all, then raises :class:`StoreUnavailable` (``worker.store.connection``)."""
        return cls(connect(url, retry_seconds), prefix=prefix, ttl_seconds=ttl_seconds)

    # writes -----------------------------------------------------------------------------------------------------
    def create_turn(
        self, conversation_id: str, message_id: str, text: str, queue: str | None = None
    ) -> tuple[Turn, bool]:
        turn = Turn(
            message_id=message_id, conversation_id=conversation_id, seq=0, text=text, queue=queue,
            created_at=self._now(),
        )
        # One script (worker.store.scripts), shared with the asyncio store: append, write, index, `queued` event.
        keys, args = scripts.create_call(self.keys, self.ttl, turn, pending_score=self._now(), queued_event=True)
        with answering():
            result = scripts.created(turn, self._create_script(keys=keys, args=args))
        if isinstance(result, MessageIdConflict):
            raise result
        return result

    def _update(
        self,
        message_id: str,
        fields: dict[str, str],
        only_from: frozenset[str] | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        tkey, ekey = self.keys.turn(message_id), self.keys.events(message_id)

        def txn(pipe: redis.client.Pipeline) -> bool:
            # WATCH: the status read and the write are one step, however many workers race on this turn.
            conv, status = pipe.hmget(tkey, ["conversation_id", "status"])
            if conv is None:
                raise unknown_message(message_id)
            if only_from is not None and status not in only_from:
                return False
            pipe.multi()
            pipe.hset(tkey, mapping=fields)
            if event is not None:
                pipe.xadd(ekey, events.entry(*event), maxlen=events.EVENTS_CAP, approximate=True)
                if event[0] in events.TERMINAL:
                    # out of the pending index at the instant a reader hears it is finished
                    pipe.zrem(self.keys.pending(), message_id)
            pipe.expire(tkey, self.ttl)
            pipe.expire(self.keys.conv(conv), self.ttl)
            pipe.expire(ekey, self.ttl)
            return True

        with answering():
            return bool(self.r.transaction(txn, tkey, value_from_callable=True))

    def bump_attempts(self, message_id: str) -> int:
        tkey = self.keys.turn(message_id)
        with answering():
            if not self.r.exists(tkey):
                raise unknown_message(message_id)
            return int(self.r.hincrby(tkey, "attempts", 1))

    # the pending index --------------------------------------------------------------------------------------------
    def mark_working(self, message_id: str) -> None:
        """A task is working on this turn now (XX: only turns already in the pending index)."""
        with answering():
            self.r.zadd(self.keys.pending(), {message_id: self._now()}, xx=True)

    def drop_pending(self, message_id: str) -> None:
        with answering():
            self.r.zrem(self.keys.pending(), message_id)

    def stale_turns(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        """Unfinished turns that no task has touched for ``older_than_seconds``, oldest first."""
        cutoff = self._now() - older_than_seconds
        with answering():
            return list(self.r.zrangebyscore(self.keys.pending(), "-inf", cutoff, start=0, num=limit))

    # reads ----------------------------------------------------------------------------------------------------
    def get_turn(self, message_id: str) -> Turn:
        with answering():
            fields = self.r.hgetall(self.keys.turn(message_id))
        if not fields:
            raise unknown_message(message_id)
        return turn_from_fields(fields)

    def get_turns(self, message_ids: list[str]) -> list[Turn | None]:
        with answering():
            pipe = self.r.pipeline(transaction=False)
            for mid in message_ids:
                pipe.hgetall(self.keys.turn(mid))
            rows = pipe.execute()
        return [turn_from_fields(f) if f else None for f in rows]

    def get_conversation(self, conversation_id: str) -> Conversation:
        with answering():
            ids = self.r.lrange(self.keys.conv(conversation_id), 0, -1)
        if not ids:
            raise UnknownConversation(f"no conversation {conversation_id!r} (never submitted to, or expired)")
        turns = [t for t in self.get_turns(ids) if t is not None]
        return Conversation(conversation_id=conversation_id, turns=turns)

    def ping(self) -> bool:
        with answering():
            return bool(self.r.ping())

    # bulk: many turns per round trip --------------------------------------------------------------------------
    def create_turns(
        self, items: list[tuple[str, str, str]], queue: str | None = None
    ) -> list[tuple[Turn, bool] | MessageIdConflict]:
        """``create_turn`` for many ``(conversation_id, message_id, text)`` in one pipeline, in list order.

        A message id already stored with another conversation or text yields its :class:`MessageIdConflict` in
        its place (returned, not raised: one bad row does not sink the others). Bulk turns stay out of the pending
        index: a bulk job re-enqueues its unfinished rows itself when run again.
        """
        fresh: list[Turn] = []
        with answering():
            pipe = self.r.pipeline(transaction=False)
            for conversation_id, message_id, text in items:
                turn = Turn(
                    message_id=message_id, conversation_id=conversation_id, seq=0, text=text, queue=queue,
                    created_at=self._now(),
                )
                fresh.append(turn)
                keys, args = scripts.create_call(self.keys, self.ttl, turn, pending_score=None, queued_event=False)
                self._create_script(keys=keys, args=args, client=pipe)
            replies = pipe.execute()
        return [scripts.created(turn, reply) for turn, reply in zip(fresh, replies, strict=True)]

    def mark_enqueued_many(self, message_ids: list[str]) -> None:
        """``mark_enqueued`` for many turns in one pipeline; ids no longer stored are left alone."""
        now = str(self._now())
        with answering():
            pipe = self.r.pipeline(transaction=False)
            for mid in message_ids:
                self._enqueued_script(keys=[self.keys.turn(mid)], args=[now], client=pipe)
            pipe.execute()

    def get_statuses(self, message_ids: list[str]) -> list[Status | None]:
        """The status of many turns in one round trip (``None``: not stored); cheaper than ``get_turns``."""
        with answering():
            pipe = self.r.pipeline(transaction=False)
            for mid in message_ids:
                pipe.hget(self.keys.turn(mid), "status")
            rows = pipe.execute()
        return [Status(s) if s else None for s in rows]
