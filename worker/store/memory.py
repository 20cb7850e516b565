"""The results store in one process's memory: the stand-in beside :class:`RedisStore`, for unit tests and for
trying the engine without Redis.

It behaves as the Redis store does, expiry included, and keeps turns in the same hash encoding, so the round trip
the Redis store does is exercised here too. Its clock (injected; wall time by default) drives everything
time-based: expiry, the pending index, locks, heartbeats (so who is dead, for the held records) and the timestamps
it writes. Tests move time forward by advancing the clock, never by editing the store's fields.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from worker import events
from worker.errors import MessageIdConflict, UnknownConversation, UnknownMessage
from worker.schemas import Conversation, Status, Turn
from worker.store import scripts
from worker.store.base import TurnWrites, unknown_message
from worker.store.codec import check_same, turn_from_fields, turn_to_fields
from worker.store.deadletters import MemoryDeadLetters
from worker.store.events import MemoryEvents
from worker.store.held import MemoryHeld
from worker.store.workers import MemoryWorkers


class MemoryStore(MemoryEvents, MemoryDeadLetters, MemoryHeld, MemoryWorkers, TurnWrites):
    """The results store in memory (thread-safe: one lock around every read and write)."""

    def __init__(self, ttl_seconds: int = 7 * 24 * 3600, clock: Callable[[], float] = time.time) -> None:
        # Wall time by default, not a monotonic clock: the timestamps the store writes (created_at, classified_at...)
        # are compared with time.time() by the steps, as the Redis store's are.
        self.clock = clock
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._turns: dict[str, dict[str, str]] = {}
        self._convs: dict[str, list[str]] = {}
        self._expiry: dict[tuple[str, str], float] = {}
        self._pending: dict[str, float] = {}
        super().__init__()

    def _now(self) -> float:
        return self.clock()

    def _live(self, kind: Literal["turn", "conv"], key: str) -> bool:
        """Whether the turn or conversation is stored and not expired; an expired one is dropped, as Redis does."""
        table: dict[str, dict[str, str]] | dict[str, list[str]] = self._turns if kind == "turn" else self._convs
        if key not in table:
            return False
        if self._expiry.get((kind, key), float("inf")) <= self._now():
            del table[key]
            self._expiry.pop((kind, key), None)
            if kind == "turn":
                self._streams.pop(key, None)  # the stream expires with its turn
            return False
        return True

    def _refresh_expiry(self, conversation_id: str, message_id: str) -> None:
        until = self._now() + self.ttl
        self._expiry["conv", conversation_id] = until
        self._expiry["turn", message_id] = until

    # writes -----------------------------------------------------------------------------------------------------
    def create_turn(
        self, conversation_id: str, message_id: str, text: str, queue: str | None = None
    ) -> tuple[Turn, bool]:
        return self._create(conversation_id, message_id, text, queue, indexed=True)

    def _create(
        self, conversation_id: str, message_id: str, text: str, queue: str | None, indexed: bool
    ) -> tuple[Turn, bool]:
        """A new turn; ``indexed``: in the pending index, with its ``queued`` event (bulk turns have neither)."""
        with self._lock:
            if self._live("turn", message_id):
                turn = turn_from_fields(self._turns[message_id])
                check_same(turn, conversation_id, text)
                return turn, False
            ids = self._convs[conversation_id] if self._live("conv", conversation_id) else []
            self._convs[conversation_id] = ids
            turn = Turn(
                message_id=message_id, conversation_id=conversation_id, seq=len(ids), text=text, queue=queue,
                created_at=self._now(),
            )
            ids.append(message_id)
            self._turns[message_id] = turn_to_fields(turn)
            self._refresh_expiry(conversation_id, message_id)
            if indexed:
                self._pending[message_id] = self._now()
                self._xadd(message_id, events.QUEUED, {"seq": turn.seq, **scripts.queued_data(turn)})
            return turn, True

    def _update(
        self,
        message_id: str,
        fields: dict[str, str],
        only_from: frozenset[str] | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        with self._lock:
            stored = self._turn_fields(message_id)
            if only_from is not None and stored.get("status") not in only_from:
                return False
            stored.update(fields)
            if event is not None:
                self._xadd(message_id, *event)
                if event[0] in events.TERMINAL:
                    self._pending.pop(message_id, None)
            self._refresh_expiry(stored["conversation_id"], message_id)
            return True

    def _turn_fields(self, message_id: str) -> dict[str, str]:
        if not self._live("turn", message_id):
            raise unknown_message(message_id)
        return self._turns[message_id]

    def bump_attempts(self, message_id: str) -> int:
        with self._lock:
            if not self._live("turn", message_id):
                raise unknown_message(message_id)
            fields = self._turns[message_id]
            fields["attempts"] = str(int(fields.get("attempts", "0")) + 1)
            return int(fields["attempts"])

    # the pending index --------------------------------------------------------------------------------------------
    def mark_working(self, message_id: str) -> None:
        with self._lock:
            if message_id in self._pending:
                self._pending[message_id] = self._now()

    def drop_pending(self, message_id: str) -> None:
        with self._lock:
            self._pending.pop(message_id, None)

    def stale_turns(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        cutoff = self._now() - older_than_seconds
        with self._lock:
            # Ties by id, as a Redis sorted set orders equal scores.
            oldest_first = sorted(self._pending.items(), key=lambda kv: (kv[1], kv[0]))
            return [mid for mid, touched in oldest_first if touched <= cutoff][:limit]

    # reads ----------------------------------------------------------------------------------------------------
    def get_turn(self, message_id: str) -> Turn:
        with self._lock:
            if not self._live("turn", message_id):
                raise unknown_message(message_id)
            return turn_from_fields(self._turns[message_id])

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
            ids = list(self._convs[conversation_id]) if self._live("conv", conversation_id) else []
        if not ids:
            raise UnknownConversation(f"no conversation {conversation_id!r} (never submitted to, or expired)")
        turns = [t for t in self.get_turns(ids) if t is not None]
        return Conversation(conversation_id=conversation_id, turns=turns)

    def ping(self) -> bool:
        return True

    # bulk: the same calls as the Redis store's, one turn at a time under the hood ------------------------------
    def create_turns(
        self, items: list[tuple[str, str, str]], queue: str | None = None
    ) -> list[tuple[Turn, bool] | MessageIdConflict]:
        out: list[tuple[Turn, bool] | MessageIdConflict] = []
        for conversation_id, message_id, text in items:
            try:
                # Bulk turns stay out of the pending index and have no `queued` event, as in Redis.
                out.append(self._create(conversation_id, message_id, text, queue, indexed=False))
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
