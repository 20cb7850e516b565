"""A turn's event stream (what the events mean: ``worker.events``): reading it, appending token events, and the
start of a reply attempt. One part of each store: ``RedisEvents`` of :class:`RedisStore`, ``MemoryEvents`` of
:class:`MemoryStore`.

The events that report a status change (``queued``, ``classified``, ``done``, ``failed``) are not written here but
by the change itself, in the same transaction (``RedisStore.create_turn`` and ``_update``), so a stream never
says what the hash does not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis

from worker import events
from worker.events import Event
from worker.store.base import StoreBase, unknown_message
from worker.store.connection import answering
from worker.store.keys import Keys

# A read returns at most this many events: a reader far behind catches up in a few calls, never one huge reply.
READ_COUNT = 1000


def parse_xread(reply: Any) -> list[Event]:
    """The events of an ``XREAD`` reply on one stream (RESP2 list or RESP3 map; nothing read: ``None``/empty)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else [entries for _, entries in reply]
    return [Event.from_fields(i, fields) for entries in streams for i, fields in entries]


def block_ms(block: float | None) -> int | None:
    """``XREAD``'s BLOCK argument: ``None`` does not block; any wait blocks at least a millisecond (0 would be for
    ever)."""
    return None if block is None else max(1, int(block * 1000))


class RedisEvents(StoreBase):
    """Event streams in Redis (mixed into ``RedisStore``, which sets ``r``, ``keys`` and ``ttl``)."""

    r: redis.Redis
    keys: Keys
    ttl: int
    _begin_reply_script: Callable[..., Any]

    def append_event(self, message_id: str, event_type: str, data: dict[str, Any]) -> str:
        key = self.keys.events(message_id)
        with answering():
            # One round trip, no MULTI: the EXPIRE only keeps a stream from outliving a turn that expired mid-reply.
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(key, events.entry(event_type, data), maxlen=events.EVENTS_CAP, approximate=True)
            pipe.expire(key, self.ttl)
            event_id, _ = pipe.execute()
        return str(event_id)

    def read_events(
        self, message_id: str, after: str = "0", block: float | None = None, count: int = READ_COUNT
    ) -> list[Event]:
        with answering():
            reply = self.r.xread({self.keys.events(message_id): after}, count=count, block=block_ms(block))
        return parse_xread(reply)

    def begin_reply(self, message_id: str) -> int:
        with answering():
            n = int(
                self._begin_reply_script(
                    keys=[self.keys.turn(message_id), self.keys.events(message_id)],
                    args=[self.ttl, events.EVENTS_CAP],
                )
            )
        if n < 0:
            raise unknown_message(message_id)
        return n


class MemoryEvents(StoreBase):
    """The same in memory: a list per turn and a condition readers block on (mixed into ``MemoryStore``, which
    sets ``_lock`` and checks the turn is stored)."""

    _lock: threading.Lock

    def __init__(self) -> None:
        super().__init__()
        self._streams: dict[str, list[Event]] = {}
        self._changed = threading.Condition(self._lock)
        self._last_ms = 0
        self._last_seq = 0

    def _turn_fields(self, message_id: str) -> dict[str, str]:
        """The stored turn's hash (the caller holds ``_lock``); :class:`UnknownMessage` when it is not stored."""
        raise NotImplementedError

    def _xadd(self, message_id: str, event_type: str, data: dict[str, Any]) -> str:
        """Append an event (the caller holds ``_lock``): ids as Redis makes them, milliseconds of the store's clock
        and a sequence number, always increasing."""
        ms = max(int(self._now() * 1000), self._last_ms)
        self._last_seq = self._last_seq + 1 if ms == self._last_ms else 0
        self._last_ms = ms
        fields = events.entry(event_type, data)
        event = Event.from_fields(f"{ms}-{self._last_seq}", fields)
        stream = self._streams.setdefault(message_id, [])
        stream.append(event)
        del stream[: -events.EVENTS_CAP]
        self._changed.notify_all()
        return event.id

    def append_event(self, message_id: str, event_type: str, data: dict[str, Any]) -> str:
        with self._lock:
            return self._xadd(message_id, event_type, data)

    def read_events(
        self, message_id: str, after: str = "0", block: float | None = None, count: int = READ_COUNT
    ) -> list[Event]:
        def found() -> list[Event]:
            return [e for e in self._streams.get(message_id, []) if events.id_after(e.id, after)][:count]

        with self._lock:
            # Real time, not the store's clock: a reader blocks as long as it would on Redis.
            self._changed.wait_for(lambda: bool(found()), timeout=block or 0)
            return found()

    def begin_reply(self, message_id: str) -> int:
        with self._lock:
            fields = self._turn_fields(message_id)
            n = int(fields.get("reply_attempts", "0")) + 1
            fields["reply_attempts"] = str(n)
            stream = self._streams.get(message_id)
            if stream and stream[-1].type == events.TOKEN:
                self._xadd(message_id, events.RESTART, {"attempt": n})
            return n
