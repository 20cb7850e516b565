"""The results store in Redis: turns, conversations and the pending index (key names: ``worker.store.keys``).

Every write refreshes the TTL of the turn and of its conversation, so a conversation lives ``ttl_seconds`` after
its last activity. Message ids are global: the same id submitted twice is one turn (idempotency), whichever process
submits it. The worker side (heartbeats, locks, queue length), the held task messages and dead letters are parts
mixed in from ``worker.store.workers``, ``worker.store.held`` and ``worker.store.deadletters``.
"""

from __future__ import annotations

from typing import Any

import redis

from worker.errors import MessageIdConflict, UnknownConversation
from worker.schemas import Conversation, Status, Turn
from worker.store.base import TurnWrites, unknown_message
from worker.store.codec import check_same, turn_from_fields, turn_to_fields
from worker.store.connection import answering, connect
from worker.store.deadletters import RedisDeadLetters
from worker.store.held import CLAIM_LUA, RedisHeld
from worker.store.keys import Keys
from worker.store.workers import RedisWorkers

# The bulk calls: one script call per turn, many calls in one pipeline (one round trip).
#
# Creating a turn, atomic like create_turn's WATCH transaction: an existing turn is returned as it is (idempotency
# by message id); otherwise the id is appended to its conversation, whose new length gives the turn's seq, and the
# turn is written with that seq.
_CREATE_LUA = """
local unpack = unpack or table.unpack
local existing = redis.call('HGETALL', KEYS[1])
if #existing > 0 then return {0, existing} end
local seq = redis.call('RPUSH', KEYS[2], ARGV[2]) - 1
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {1, seq}
"""
# Marking a turn enqueued, unless it expired meanwhile (HSET alone would create a turn of one field).
_ENQUEUED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'enqueued_at', ARGV[1])
return 1
"""


class RedisStore(RedisDeadLetters, RedisHeld, RedisWorkers, TurnWrites):
    """The results store in Redis."""

    def __init__(self, client: redis.Redis, prefix: str = "allinone", ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.keys = Keys(prefix)
        self.ttl = ttl_seconds
        self._create_script = client.register_script(_CREATE_LUA)
        self._enqueued_script = client.register_script(_ENQUEUED_LUA)
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
        tkey, ckey = self.keys.turn(message_id), self.keys.conv(conversation_id)

        def txn(pipe: redis.client.Pipeline) -> tuple[Turn, bool]:
            # WATCH makes "read the length, append at that index" atomic against other producers.
            existing = pipe.hgetall(tkey)
            if existing:
                return turn_from_fields(existing), False
            seq = pipe.llen(ckey)
            turn = Turn(
                message_id=message_id, conversation_id=conversation_id, seq=seq, text=text, queue=queue,
                created_at=self._now(),
            )
            pipe.multi()
            pipe.rpush(ckey, message_id)
            pipe.hset(tkey, mapping=turn_to_fields(turn))
            pipe.expire(ckey, self.ttl)
            pipe.expire(tkey, self.ttl)
            pipe.zadd(self.keys.pending(), {message_id: self._now()})
            return turn, True

        with answering():
            turn, created = self.r.transaction(txn, tkey, ckey, value_from_callable=True)
        if not created:
            check_same(turn, conversation_id, text)
        return turn, created

    def _update(self, message_id: str, fields: dict[str, str], only_from: frozenset[str] | None = None) -> bool:
        tkey = self.keys.turn(message_id)

        def txn(pipe: redis.client.Pipeline) -> bool:
            # WATCH: the status read and the write are one step, however many workers race on this turn.
            conv, status = pipe.hmget(tkey, ["conversation_id", "status"])
            if conv is None:
                raise unknown_message(message_id)
            if only_from is not None and status not in only_from:
                return False
            pipe.multi()
            pipe.hset(tkey, mapping=fields)
            pipe.expire(tkey, self.ttl)
            pipe.expire(self.keys.conv(conv), self.ttl)
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
                fields = turn_to_fields(turn)
                del fields["seq"]  # the script writes the seq it assigns
                fresh.append(turn)
                args: list[Any] = [self.ttl, message_id]
                for k, v in fields.items():
                    args += [k, v]
                self._create_script(
                    keys=[self.keys.turn(message_id), self.keys.conv(conversation_id)], args=args, client=pipe
                )
            replies = pipe.execute()
        out: list[tuple[Turn, bool] | MessageIdConflict] = []
        for turn, (created, value) in zip(fresh, replies, strict=True):
            if created:
                out.append((turn.model_copy(update={"seq": int(value)}), True))
                continue
            old = turn_from_fields(dict(zip(value[::2], value[1::2], strict=True)))
            try:
                check_same(old, turn.conversation_id, turn.text)
                out.append((old, False))
            except MessageIdConflict as e:
                out.append(e)
        return out

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
