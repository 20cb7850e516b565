"""The results store, keyed by conversation id: a Redis implementation and an in-memory stand-in.

Redis key layout (``{p}`` is ``ALLINONE_KEY_PREFIX``, default ``allinone``)::

    {p}:conv:{conversation_id}   list   message ids in submission order; a turn's index is its ``seq``
    {p}:turn:{message_id}        hash   one turn: message_id, conversation_id, seq, text, status, sentiment (JSON),
                                        reply, error, model, queue, created_at, classified_at, done_at, attempts
    {p}:deadletter               list   JSON {"payload", "reason", "at"} of task messages that could not be tied
                                        to a turn (malformed payloads), newest first, capped at 10,000
    {p}:worker:{hostname}        hash   heartbeat of a worker whose model is loaded (expires when it stops beating)
    {p}:pending                  zset   unfinished turns submitted one by one, scored by the last time a task
                                        touched them; a worker re-enqueues those untouched for
                                        ALLINONE_STALE_AFTER_SECONDS (their task was lost), then they leave the set
    {p}:lock:{name}              string a lock that expires by itself (one worker sweeps at a time)

Every write refreshes the TTL (``ALLINONE_RESULT_TTL_SECONDS``) of the turn and of its conversation, so a
conversation lives that long after its last activity. Message ids are global: the same id submitted twice is one
turn (idempotency), whichever process submits it.

This module must stay importable without torch: the producer uses it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker.errors import MessageIdConflict, StoreUnavailable, UnknownConversation, UnknownMessage
from worker.schemas import Conversation, Sentiment, Status, Turn

T = TypeVar("T")
DEADLETTER_CAP = 10_000


class ResultsStore(Protocol):
    """What the worker and the producer need from a results store."""

    def create_turn(
        self, conversation_id: str, message_id: str, text: str, queue: str | None = None
    ) -> tuple[Turn, bool]:
        """Append a queued turn; idempotent by message id. Returns (turn, created)."""
        ...

    def get_turn(self, message_id: str) -> Turn: ...

    def get_turns(self, message_ids: list[str]) -> list[Turn | None]: ...

    def get_conversation(self, conversation_id: str) -> Conversation: ...

    def mark_enqueued(self, message_id: str) -> None: ...

    def mark_working(self, message_id: str) -> None:
        """Record that a task is working on this turn (keeps it out of the stale sweep)."""
        ...

    def drop_pending(self, message_id: str) -> None: ...

    def stale_turns(self, older_than_seconds: float, limit: int = 100) -> list[str]: ...

    def try_lock(self, name: str, ttl_seconds: int) -> bool: ...

    def queue_length(self, queue: str) -> int: ...

    def mark_classified(self, message_id: str, sentiment: Sentiment, model: str) -> bool: ...

    def mark_done(
        self, message_id: str, reply: str, model: str, error: str | None = None, context: list[str] | None = None
    ) -> bool: ...

    def mark_failed(self, message_id: str, reason: str) -> bool: ...

    def bump_attempts(self, message_id: str) -> int: ...

    def dead_letter(self, payload: Any, reason: str) -> None: ...

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]: ...

    def heartbeat(self, worker: str, info: dict[str, Any], ttl: int) -> None: ...

    def workers(self) -> dict[str, dict[str, Any]]: ...

    def ping(self) -> bool: ...


# --------------------------------------------------------------------------------------------------------------
# Encoding of a turn as a flat hash (shared by both stores so they cannot drift apart).


def _turn_to_fields(turn: Turn) -> dict[str, str]:
    data = turn.model_dump(mode="json", exclude_none=True)
    for k in ("sentiment", "context"):
        if k in data:
            data[k] = json.dumps(data[k])
    return {k: str(v) if not isinstance(v, str) else v for k, v in data.items()}


def _turn_from_fields(fields: dict[str, str]) -> Turn:
    data: dict[str, Any] = dict(fields)
    for k in ("sentiment", "context"):
        if k in data:
            data[k] = json.loads(data[k])
    return Turn.model_validate(data)


def _done_fields(reply: str, model: str, error: str | None, context: list[str] | None) -> dict[str, str]:
    fields = {"status": Status.done.value, "reply": reply, "model": model, "done_at": str(time.time())}
    if error:
        fields["error"] = error
    if context is not None:
        fields["context"] = json.dumps(context)
    return fields


def _check_same(turn: Turn, conversation_id: str, text: str) -> None:
    if turn.conversation_id != conversation_id or turn.text != text:
        where = (
            f"to conversation {turn.conversation_id!r}"
            if turn.conversation_id != conversation_id
            else "with another text"
        )
        raise MessageIdConflict(f"message id {turn.message_id!r} was already submitted {where}")


# --------------------------------------------------------------------------------------------------------------


_OPEN = frozenset({Status.queued.value, Status.classified.value})


class _TurnWrites:
    """The status transitions of a turn, written the same way by both stores.

    Each store supplies ``_update`` (atomic: writes only when the turn's status is one of ``only_from``) and the
    pending index (``mark_working``/``drop_pending``). Transitions only go forward, and the first writer wins: a
    duplicate task racing the original can never turn ``done`` back into ``classified`` or replace a stored reply.
    """

    def _update(self, message_id: str, fields: dict[str, str], only_from: frozenset[str] | None = None) -> bool:
        raise NotImplementedError

    def mark_working(self, message_id: str) -> None:
        raise NotImplementedError

    def drop_pending(self, message_id: str) -> None:
        raise NotImplementedError

    def mark_enqueued(self, message_id: str) -> None:
        self._update(message_id, {"enqueued_at": str(time.time())})

    def mark_classified(self, message_id: str, sentiment: Sentiment, model: str) -> bool:
        fields = {
            "status": Status.classified.value,
            "sentiment": sentiment.model_dump_json(),
            "model": model,
            "classified_at": str(time.time()),
        }
        written = self._update(message_id, fields, only_from=frozenset({Status.queued.value}))
        self.mark_working(message_id)
        return written

    def mark_done(
        self, message_id: str, reply: str, model: str, error: str | None = None, context: list[str] | None = None
    ) -> bool:
        written = self._update(message_id, _done_fields(reply, model, error, context), only_from=_OPEN)
        self.drop_pending(message_id)
        return written

    def mark_failed(self, message_id: str, reason: str) -> bool:
        fields = {"status": Status.failed.value, "error": reason, "done_at": str(time.time())}
        written = self._update(message_id, fields, only_from=_OPEN)
        self.drop_pending(message_id)
        return written


class RedisStore(_TurnWrites):
    """The results store in Redis (layout in the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "allinone",
        ttl_seconds: int = 7 * 24 * 3600,
    ) -> None:
        self.r = client
        self.prefix = prefix
        self.ttl = ttl_seconds

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "allinone", ttl_seconds: int = 7 * 24 * 3600, retry_seconds: float = 10.0
    ) -> RedisStore:
        """A store whose client retries a Redis that went away, with exponential backoff, for about
        ``retry_seconds`` in all, then raises :class:`StoreUnavailable`."""
        # redis-py's own retry: backoff 0.1 s doubling up to 2 s; enough tries to span retry_seconds.
        tries, spent, step = 0, 0.0, 0.1
        while spent < retry_seconds:
            spent += min(step, 2.0) + 1.0  # + socket_connect_timeout of each try
            step *= 2
            tries += 1
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=1.0,
            socket_timeout=10.0,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), tries),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        )
        return cls(client, prefix=prefix, ttl_seconds=ttl_seconds)

    # keys -------------------------------------------------------------------------------------------------
    def conv_key(self, conversation_id: str) -> str:
        return f"{self.prefix}:conv:{conversation_id}"

    def turn_key(self, message_id: str) -> str:
        return f"{self.prefix}:turn:{message_id}"

    @property
    def deadletter_key(self) -> str:
        return f"{self.prefix}:deadletter"

    def worker_key(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}"

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailable(f"Redis did not answer: {e}") from e

    # writes -----------------------------------------------------------------------------------------------
    def create_turn(
        self, conversation_id: str, message_id: str, text: str, queue: str | None = None
    ) -> tuple[Turn, bool]:
        tkey, ckey = self.turn_key(message_id), self.conv_key(conversation_id)

        def txn(pipe: redis.client.Pipeline) -> tuple[Turn, bool]:
            # WATCH makes "read the length, append at that index" atomic against other producers.
            existing = pipe.hgetall(tkey)
            if existing:
                return _turn_from_fields(existing), False
            seq = pipe.llen(ckey)
            turn = Turn(message_id=message_id, conversation_id=conversation_id, seq=seq, text=text, queue=queue)
            pipe.multi()
            pipe.rpush(ckey, message_id)
            pipe.hset(tkey, mapping=_turn_to_fields(turn))
            pipe.expire(ckey, self.ttl)
            pipe.expire(tkey, self.ttl)
            pipe.zadd(self.pending_key, {message_id: time.time()})
            return turn, True

        with self._guard():
            turn, created = self.r.transaction(txn, tkey, ckey, value_from_callable=True)
        if not created:
            _check_same(turn, conversation_id, text)
        return turn, created

    def _update(self, message_id: str, fields: dict[str, str], only_from: frozenset[str] | None = None) -> bool:
        tkey = self.turn_key(message_id)

        def txn(pipe: redis.client.Pipeline) -> bool:
            # WATCH: the status read and the write are one step, however many workers race on this turn.
            conv, status = pipe.hmget(tkey, ["conversation_id", "status"])
            if conv is None:
                raise UnknownMessage(f"no turn with message id {message_id!r} (never submitted, or expired)")
            if only_from is not None and status not in only_from:
                return False
            pipe.multi()
            pipe.hset(tkey, mapping=fields)
            pipe.expire(tkey, self.ttl)
            pipe.expire(self.conv_key(conv), self.ttl)
            return True

        with self._guard():
            return bool(self.r.transaction(txn, tkey, value_from_callable=True))

    @property
    def pending_key(self) -> str:
        return f"{self.prefix}:pending"

    def mark_working(self, message_id: str) -> None:
        """A task is working on this turn now (XX: only turns already in the pending index)."""
        with self._guard():
            self.r.zadd(self.pending_key, {message_id: time.time()}, xx=True)

    def drop_pending(self, message_id: str) -> None:
        with self._guard():
            self.r.zrem(self.pending_key, message_id)

    def stale_turns(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        """Unfinished turns that no task has touched for ``older_than_seconds``, oldest first."""
        with self._guard():
            return list(
                self.r.zrangebyscore(self.pending_key, "-inf", time.time() - older_than_seconds, start=0, num=limit)
            )

    def queue_length(self, queue: str) -> int:
        """Messages waiting on a Celery queue in this Redis (kombu keeps a queue as a list named after it)."""
        with self._guard():
            return int(self.r.llen(queue))

    def try_lock(self, name: str, ttl_seconds: int) -> bool:
        """A lock that expires by itself: one worker at a time does a periodic chore."""
        with self._guard():
            return bool(self.r.set(f"{self.prefix}:lock:{name}", str(time.time()), nx=True, ex=ttl_seconds))

    def bump_attempts(self, message_id: str) -> int:
        tkey = self.turn_key(message_id)
        with self._guard():
            if not self.r.exists(tkey):
                raise UnknownMessage(f"no turn with message id {message_id!r} (never submitted, or expired)")
            return int(self.r.hincrby(tkey, "attempts", 1))

    def dead_letter(self, payload: Any, reason: str) -> None:
        record = json.dumps({"payload": payload, "reason": reason, "at": time.time()}, default=repr)
        with self._guard():
            pipe = self.r.pipeline(transaction=True)
            pipe.lpush(self.deadletter_key, record)
            pipe.ltrim(self.deadletter_key, 0, DEADLETTER_CAP - 1)
            pipe.execute()

    def heartbeat(self, worker: str, info: dict[str, Any], ttl: int) -> None:
        key = self.worker_key(worker)
        with self._guard():
            pipe = self.r.pipeline(transaction=True)
            pipe.hset(key, mapping={k: json.dumps(v) for k, v in info.items()})
            pipe.expire(key, ttl)
            pipe.execute()

    # reads ------------------------------------------------------------------------------------------------
    def get_turn(self, message_id: str) -> Turn:
        with self._guard():
            fields = self.r.hgetall(self.turn_key(message_id))
        if not fields:
            raise UnknownMessage(f"no turn with message id {message_id!r} (never submitted, or expired)")
        return _turn_from_fields(fields)

    def get_turns(self, message_ids: list[str]) -> list[Turn | None]:
        with self._guard():
            pipe = self.r.pipeline(transaction=False)
            for mid in message_ids:
                pipe.hgetall(self.turn_key(mid))
            rows = pipe.execute()
        return [_turn_from_fields(f) if f else None for f in rows]

    def get_conversation(self, conversation_id: str) -> Conversation:
        with self._guard():
            ids = self.r.lrange(self.conv_key(conversation_id), 0, -1)
        if not ids:
            raise UnknownConversation(f"no conversation {conversation_id!r} (never submitted to, or expired)")
        turns = [t for t in self.get_turns(ids) if t is not None]
        return Conversation(conversation_id=conversation_id, turns=turns)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._guard():
            return [json.loads(x) for x in self.r.lrange(self.deadletter_key, 0, limit - 1)]

    def workers(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with self._guard():
            for key in self.r.scan_iter(match=f"{self.prefix}:worker:*", count=100):
                fields = self.r.hgetall(key)
                if fields:
                    out[key.split(":worker:", 1)[1]] = {k: json.loads(v) for k, v in fields.items()}
        return out

    def ping(self) -> bool:
        with self._guard():
            return bool(self.r.ping())

    # bulk: many turns per round trip ------------------------------------------------------------------------
    # One script call per turn, atomic like create_turn's WATCH transaction: an existing turn is returned as it
    # is (idempotency by message id); otherwise the id is appended to its conversation, whose new length gives
    # the turn's seq, and the turn is written with that seq. Many calls go in one pipeline (one round trip).
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
    _ENQUEUED_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'enqueued_at', ARGV[1])
return 1
"""

    def create_turns(
        self, items: list[tuple[str, str, str]], queue: str | None = None
    ) -> list[tuple[Turn, bool] | MessageIdConflict]:
        """``create_turn`` for many ``(conversation_id, message_id, text)`` in one pipeline, in list order.

        A message id already stored with another conversation or text yields its :class:`MessageIdConflict` in
        its place (returned, not raised: one bad row does not sink the others).
        """
        if not hasattr(self, "_create_script"):
            self._create_script = self.r.register_script(self._CREATE_LUA)
        fresh: list[Turn] = []
        with self._guard():
            pipe = self.r.pipeline(transaction=False)
            for conversation_id, message_id, text in items:
                turn = Turn(message_id=message_id, conversation_id=conversation_id, seq=0, text=text, queue=queue)
                fields = _turn_to_fields(turn)
                del fields["seq"]
                fresh.append(turn)
                args: list[Any] = [self.ttl, message_id]
                for k, v in fields.items():
                    args += [k, v]
                self._create_script(
                    keys=[self.turn_key(message_id), self.conv_key(conversation_id)], args=args, client=pipe
                )
            replies = pipe.execute()
        out: list[tuple[Turn, bool] | MessageIdConflict] = []
        for turn, (created, value) in zip(fresh, replies, strict=True):
            if created:
                out.append((turn.model_copy(update={"seq": int(value)}), True))
                continue
            old = _turn_from_fields(dict(zip(value[::2], value[1::2], strict=True)))
            try:
                _check_same(old, turn.conversation_id, turn.text)
                out.append((old, False))
            except MessageIdConflict as e:
                out.append(e)
        return out

    def mark_enqueued_many(self, message_ids: list[str]) -> None:
        """``mark_enqueued`` for many turns in one pipeline; ids no longer stored are left alone."""
        if not hasattr(self, "_enqueued_script"):
            self._enqueued_script = self.r.register_script(self._ENQUEUED_LUA)
        now = str(time.time())
        with self._guard():
            pipe = self.r.pipeline(transaction=False)
            for mid in message_ids:
                self._enqueued_script(keys=[self.turn_key(mid)], args=[now], client=pipe)
            pipe.execute()

    def get_statuses(self, message_ids: list[str]) -> list[Status | None]:
        """The status of many turns in one round trip (``None``: not stored); cheaper than ``get_turns``."""
        with self._guard():
            pipe = self.r.pipeline(transaction=False)
            for mid in message_ids:
                pipe.hget(self.turn_key(mid), "status")
            rows = pipe.execute()
        return [Status(s) if s else None for s in rows]


# --------------------------------------------------------------------------------------------------------------


class MemoryStore(_TurnWrites):
    """The same store in one process's memory, for unit tests and for trying the engine without Redis.

    Turns are kept in their hash encoding so that the round trip the Redis store does is exercised here too.
    """

    def __init__(self, ttl_seconds: int = 7 * 24 * 3600, clock: Callable[[], float] = time.monotonic) -> None:
        self._turns: dict[str, dict[str, str]] = {}
        self._convs: dict[str, list[str]] = {}
        self._expiry: dict[str, float] = {}
        self._dead: list[dict[str, Any]] = []
        self._workers: dict[str, tuple[float, dict[str, Any]]] = {}
        self._pending: dict[str, float] = {}
        self._locks: dict[str, float] = {}
        self._lock = threading.Lock()
        self.ttl = ttl_seconds
        self.clock = clock

    def _alive(self, key: str) -> bool:
        if self._expiry.get(key, float("inf")) <= self.clock():
            self._turns.pop(key[2:], None) if key.startswith("t:") else self._convs.pop(key[2:], None)
            self._expiry.pop(key, None)
            return False
        return True

    def _refresh_expiry(self, conversation_id: str, message_id: str) -> None:
        now = self.clock()
        self._expiry["c:" + conversation_id] = now + self.ttl
        self._expiry["t:" + message_id] = now + self.ttl

    def create_turn(
        self, conversation_id: str, message_id: str, text: str, queue: str | None = None
    ) -> tuple[Turn, bool]:
        with self._lock:
            if message_id in self._turns and self._alive("t:" + message_id):
                turn = _turn_from_fields(self._turns[message_id])
                _check_same(turn, conversation_id, text)
                return turn, False
            ids = self._convs.setdefault(conversation_id, []) if self._alive("c:" + conversation_id) else []
            self._convs[conversation_id] = ids
            turn = Turn(message_id=message_id, conversation_id=conversation_id, seq=len(ids), text=text, queue=queue)
            ids.append(message_id)
            self._turns[message_id] = _turn_to_fields(turn)
            self._refresh_expiry(conversation_id, message_id)
            self._pending[message_id] = time.time()
            return turn, True

    def _update(self, message_id: str, fields: dict[str, str], only_from: frozenset[str] | None = None) -> bool:
        with self._lock:
            if message_id not in self._turns or not self._alive("t:" + message_id):
                raise UnknownMessage(f"no turn with message id {message_id!r} (never submitted, or expired)")
            if only_from is not None and self._turns[message_id].get("status") not in only_from:
                return False
            self._turns[message_id].update(fields)
            self._refresh_expiry(self._turns[message_id]["conversation_id"], message_id)
            return True

    def mark_working(self, message_id: str) -> None:
        with self._lock:
            if message_id in self._pending:
                self._pending[message_id] = time.time()

    def drop_pending(self, message_id: str) -> None:
        with self._lock:
            self._pending.pop(message_id, None)

    def stale_turns(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        cutoff = time.time() - older_than_seconds
        with self._lock:
            return [m for m, t in sorted(self._pending.items(), key=lambda kv: kv[1]) if t <= cutoff][:limit]

    def queue_length(self, queue: str) -> int:
        return 0  # no broker in memory: nothing waits

    def try_lock(self, name: str, ttl_seconds: int) -> bool:
        now = self.clock()
        if self._locks.get(name, 0.0) > now:
            return False
        self._locks[name] = now + ttl_seconds
        return True

    def bump_attempts(self, message_id: str) -> int:
        with self._lock:
            if message_id not in self._turns or not self._alive("t:" + message_id):
                raise UnknownMessage(f"no turn with message id {message_id!r} (never submitted, or expired)")
            fields = self._turns[message_id]
            fields["attempts"] = str(int(fields.get("attempts", "0")) + 1)
            return int(fields["attempts"])

    def dead_letter(self, payload: Any, reason: str) -> None:
        with self._lock:
            self._dead.insert(0, {"payload": payload, "reason": reason, "at": time.time()})
            del self._dead[DEADLETTER_CAP:]

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self._dead[:limit])

    def heartbeat(self, worker: str, info: dict[str, Any], ttl: int) -> None:
        self._workers[worker] = (self.clock() + ttl, dict(info))

    def workers(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {w: info for w, (until, info) in self._workers.items() if until > now}

    def get_turn(self, message_id: str) -> Turn:
        with self._lock:
            if message_id not in self._turns or not self._alive("t:" + message_id):
                raise UnknownMessage(f"no turn with message id {message_id!r} (never submitted, or expired)")
            return _turn_from_fields(self._turns[message_id])

    def get_turns(self, message_ids: list[str]) -> list[Turn | None]:
        out: list[Turn | None] = []
        for mid in message_ids:
            try:
                out.append(self.get_turn(mid))
            except UnknownMessage:
                out.append(None)
        return out

    def get_conversation(self, conversation_id: str) -> Conversation:
        with self._lock:
            ids = list(self._convs.get(conversation_id, [])) if self._alive("c:" + conversation_id) else []
        if not ids:
            raise UnknownConversation(f"no conversation {conversation_id!r} (never submitted to, or expired)")
        turns = [t for t in self.get_turns(ids) if t is not None]
        return Conversation(conversation_id=conversation_id, turns=turns)

    def ping(self) -> bool:
        return True

    # bulk: the same calls as RedisStore's, one turn at a time under the hood ----------------------------------
    def create_turns(
        self, items: list[tuple[str, str, str]], queue: str | None = None
    ) -> list[tuple[Turn, bool] | MessageIdConflict]:
        out: list[tuple[Turn, bool] | MessageIdConflict] = []
        for conversation_id, message_id, text in items:
            try:
                out.append(self.create_turn(conversation_id, message_id, text, queue=queue))
            except MessageIdConflict as e:
                out.append(e)
        return out

    def mark_enqueued_many(self, message_ids: list[str]) -> None:
        for mid in message_ids:
            try:
                self.mark_enqueued(mid)
            except UnknownMessage:
                pass

    def get_statuses(self, message_ids: list[str]) -> list[Status | None]:
        return [t.status if t is not None else None for t in self.get_turns(message_ids)]


def store_from_settings(settings: Any = None) -> RedisStore:
    """The Redis store the settings point at."""
    from worker.settings import get_settings

    s = settings or get_settings()
    return RedisStore.from_url(
        s.redis_url, prefix=s.key_prefix, ttl_seconds=s.result_ttl_seconds, retry_seconds=s.redis_retry_seconds
    )
