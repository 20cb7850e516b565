"""A turn's events: what a reader of its stream hears, in order, and how a reply's tokens become events.

Every turn has one Redis stream (``Keys.events``) written by the store in the same transaction as the status
change it reports, so an event is there exactly when its change is (the turn's hash stays the source of truth):

- ``queued`` ``{"seq", "conversation_id", "queue"}``: written by ``create_turn`` (bulk turns have none);
- ``classified`` ``{"label", "confidence", "method"}``: ``mark_classified``;
- ``token`` ``{"text"}``, the next piece of the reply: the reply step, a few a second;
- ``restart`` ``{"attempt"}``, drop the partial reply heard so far: ``begin_reply``, when an earlier attempt of the
  reply was cut off after its first tokens (a worker died, a retry);
- ``done`` ``{"reply", "context", "model", "error", "timing"}``: ``mark_done``;
- ``failed`` ``{"reason"}``: ``mark_failed``.

An event's id is its Redis stream id (``1718000000000-0``): increasing, so a reader resumes after the last one it
saw (``after=``, SSE's ``Last-Event-ID``). ``done`` and ``failed`` are terminal: nothing follows them. The reply in
``done`` is the whole reply as stored; the ``token`` texts are how it was written, a preview a reader replaces.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

QUEUED, CLASSIFIED, TOKEN, RESTART, DONE, FAILED = "queued", "classified", "token", "restart", "done", "failed"
TYPES = (QUEUED, CLASSIFIED, TOKEN, RESTART, DONE, FAILED)
TERMINAL = frozenset({DONE, FAILED})

# A stream is trimmed (approximately: whole radix-tree nodes at a time, which is cheap) to about this many events.
# Far above what one turn writes: its reply is bounded in tokens and each token event carries at least one token.
EVENTS_CAP = 10_000


@dataclass(frozen=True)
class Event:
    """One event of a turn's stream: its stream id, its type and its data."""

    id: str
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    @classmethod
    def from_fields(cls, event_id: str, fields: dict[str, str]) -> Event:
        """The event a stream entry holds (fields ``type`` and ``data``)."""
        return cls(id=event_id, type=fields.get("type", ""), data=json.loads(fields.get("data") or "{}"))

    def public(self) -> dict[str, Any]:
        """The JSON a user sees (``producer follow --json``)."""
        return {"id": self.id, "type": self.type, "data": self.data}


def entry(event_type: str, data: dict[str, Any]) -> dict[str, str]:
    """The stream entry of an event (what ``XADD`` writes)."""
    if event_type not in TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    return {"type": event_type, "data": json.dumps(data, ensure_ascii=False, separators=(",", ":"))}


def id_after(a: str, b: str) -> bool:
    """Whether stream id ``a`` comes after ``b`` (``"0"`` is before every event)."""

    def key(i: str) -> tuple[int, int]:
        ms, _, seq = i.partition("-")
        return int(ms), int(seq or 0)

    return key(a) > key(b)


def check_event_id(value: str) -> str:
    """A stream id a reader may resume after (``0``, ``1718000000000`` or ``1718000000000-3``), or ValueError."""
    ms, sep, seq = value.partition("-")
    if not ms.isdigit() or (sep and not seq.isdigit()):
        raise ValueError(f"{value!r} is not an event id (expected like 1718000000000-0)")
    return value


# ------------------------------------------------------------------------------------------- token events
@dataclass(frozen=True)
class TokenPolicy:
    """Which replies stream ``token`` events, and how often (``ALLINONE_TOKEN_EVENTS``,
    ``ALLINONE_TOKEN_EVENT_SECONDS``)."""

    interval: float
    skip_queue: str | None = None  # turns on this queue (the bulk queue) get no token events

    @classmethod
    def from_settings(cls, settings: Any) -> TokenPolicy | None:
        if settings.token_events == "off":
            return None
        skip = settings.bulk_queue if settings.token_events == "live" else None
        return cls(interval=settings.token_event_seconds, skip_queue=skip)

    def streams(self, queue: str | None) -> bool:
        return self.skip_queue is None or queue != self.skip_queue


class TokenEvents:
    """A reply's text deltas (the engine's ``on_text``) as ``token`` events: the first at once, then at most one
    per ``interval`` carrying everything written since, and the rest at :meth:`flush`.

    Batching is what keeps events from costing decode speed: the decode loop only appends to a list, and one event
    write (one Redis round trip) covers every token of an interval. A failed write raises out of the decode: the
    attempt ends and its retry starts over with a ``restart`` event, so no reader sees a reply with a hole in it.
    """

    def __init__(
        self, emit: Callable[[str], None], interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self.events = 0
        self.first_text_at: float | None = None  # wall time the reply's first text was there to send
        self._pending: list[str] = []
        self._last = float("-inf")

    def __call__(self, text: str) -> None:
        if not text:
            return
        if self.first_text_at is None:
            self.first_text_at = time.time()
        self._pending.append(text)
        if self.clock() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Write what is pending as one event (the reply step calls it once the decode is over)."""
        if not self._pending:
            return
        text, self._pending = "".join(self._pending), []
        self._last = self.clock()
        self.emit(text)
        self.events += 1
