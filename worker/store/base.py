"""What a results store is (:class:`ResultsStore`) and the part both stores share: a turn's status transitions.

Every backend is a :class:`StoreBase` (it reads time through ``_now()``, so the memory store's injected clock drives
every timestamp it writes) and gets its transitions from :class:`TurnWrites`, written once on top of the backend's
atomic ``_update`` primitive, the way Dramatiq's ``ResultBackend`` builds on a backend's ``_get``/``_store``.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from worker import events
from worker.errors import MessageIdConflict, UnknownMessage
from worker.events import Event
from worker.schemas import Conversation, HeldTask, Sentiment, Status, Turn
from worker.store.codec import done_fields


class ResultsStore(Protocol):
    """What the worker and the producers need from a results store."""

    # turns ---------------------------------------------------------------------------------------------------
    def create_turn(
        self, conversation_id: str, message_id: str, text: str, queue: str | None = None
    ) -> tuple[Turn, bool]:
        """Append a queued turn; idempotent by message id. Returns (turn, created).

        Raises :class:`MessageIdConflict` when the id is stored with another conversation or text."""
        ...

    def create_turns(
        self, items: list[tuple[str, str, str]], queue: str | None = None
    ) -> list[tuple[Turn, bool] | MessageIdConflict]:
        """``create_turn`` for many ``(conversation_id, message_id, text)``, in list order, in one round trip.

        A conflict is returned in its row's place, not raised: one bad row does not sink the others."""
        ...

    def get_turn(self, message_id: str) -> Turn:
        """The turn; :class:`UnknownMessage` when it was never submitted or has expired."""
        ...

    def get_turns(self, message_ids: list[str]) -> list[Turn | None]:
        """Many turns in one round trip, ``None`` for those not stored."""
        ...

    def get_statuses(self, message_ids: list[str]) -> list[Status | None]:
        """Only the status of many turns (``None``: not stored); cheaper than ``get_turns``."""
        ...

    def get_conversation(self, conversation_id: str) -> Conversation:
        """The conversation's turns in submission order; :class:`UnknownConversation` when there are none."""
        ...

    # status transitions (forward only; the first writer wins) --------------------------------------------------
    def mark_enqueued(self, message_id: str) -> None:
        """Record when the turn's task was sent."""
        ...

    def mark_enqueued_many(self, message_ids: list[str]) -> None:
        """``mark_enqueued`` for many turns in one round trip; ids no longer stored are left alone."""
        ...

    def mark_classified(self, message_id: str, sentiment: Sentiment, model: str) -> bool:
        """Store the sentiment of a queued turn; False when another task got there first."""
        ...

    def mark_done(
        self,
        message_id: str,
        reply: str,
        model: str,
        error: str | None = None,
        context: list[str] | None = None,
        timing: dict[str, float] | None = None,
    ) -> bool:
        """Store the reply of an unfinished turn (``context``: the earlier turns it saw; ``timing``: how it was
        written, for the ``done`` event); False when it was finished already."""
        ...

    def mark_failed(self, message_id: str, reason: str) -> bool:
        """Fail an unfinished turn with the reason; False when it was finished already."""
        ...

    def bump_attempts(self, message_id: str) -> int:
        """Count one more delivery of the turn's task; returns the count."""
        ...

    # the turn's event stream (worker.events) ------------------------------------------------------------------
    def read_events(
        self, message_id: str, after: str = "0", block: float | None = None, count: int = 1000
    ) -> list[Event]:
        """The turn's events after event id ``after`` (``"0"``: from the first), at most ``count``; when there are
        none yet, wait up to ``block`` seconds for one (``None``: do not wait). Nothing stored: an empty list."""
        ...

    def append_event(self, message_id: str, event_type: str, data: dict[str, Any]) -> str:
        """Append an event that reports no status change (``token``); returns its id."""
        ...

    def begin_reply(self, message_id: str) -> int:
        """A reply attempt starts: count it (``reply_attempts``) and, when an earlier attempt's tokens were the last
        events, append ``restart``. Returns the attempt number."""
        ...

    # the pending index: unfinished turns, for the stale sweep ---------------------------------------------------
    def mark_working(self, message_id: str) -> None:
        """A task is working on this turn now: it stays out of the stale sweep for a while."""
        ...

    def drop_pending(self, message_id: str) -> None:
        """The turn leaves the pending index (it is finished, or gone)."""
        ...

    def stale_turns(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        """Unfinished turns that no task has touched for ``older_than_seconds``, oldest first."""
        ...

    # the worker side -------------------------------------------------------------------------------------------
    def heartbeat(self, worker: str, info: dict[str, Any], ttl: int) -> None:
        """This worker is alive with its model loaded, for ``ttl`` seconds."""
        ...

    def workers(self) -> dict[str, dict[str, Any]]:
        """The workers whose heartbeat has not expired, with what they last said."""
        ...

    def try_lock(self, name: str, ttl_seconds: int) -> bool:
        """Take a lock that expires by itself (one worker at a time does a periodic chore)."""
        ...

    def queue_length(self, queue: str) -> int:
        """Messages waiting on a Celery queue."""
        ...

    # held task messages: who holds what, for getting a dead worker's work back (``worker.store.held``) ---------
    def hold(self, worker: str, task: HeldTask) -> None:
        """The worker holds this task message (received it; runs it now, or when its countdown is due)."""
        ...

    def release(self, worker: str, task_id: str, claimed: bool = False) -> None:
        """The worker holds the task no more: it ended (done, failed, or re-sent by a retry); with ``claimed``,
        a record the worker claimed from a dead one is dealt with (its message is back on a queue)."""
        ...

    def held_by(self, worker: str, claimed: bool = False) -> list[HeldTask]:
        """What the worker holds (``claimed``: the records it claimed from dead workers and has not yet put back)."""
        ...

    def dead_holders(self) -> list[str]:
        """Workers that may hold task messages but whose heartbeat expired."""
        ...

    def claim_held(self, dead: str, by: str) -> list[HeldTask] | None:
        """Take over everything ``dead`` held, into ``by``'s list as claimed records, atomically; ``None`` (and
        nothing moved) while ``dead`` still beats. Of two workers claiming at once, one gets the records, the
        other ``[]``."""
        ...

    def held_message_ids(self) -> set[str]:
        """Every turn some worker holds a task message of."""
        ...

    def held_task_ids(self) -> set[str]:
        """The task id of every message some worker holds (or claimed from a dead one)."""
        ...

    def dead_letter(self, payload: Any, reason: str) -> None:
        """Keep a task message that could not be processed, and why."""
        ...

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The dead letters, newest first."""
        ...

    def ping(self) -> bool:
        """True when the store answers."""
        ...


def unknown_message(message_id: str) -> UnknownMessage:
    return UnknownMessage(f"no turn with message id {message_id!r} (never submitted, or expired)")


class StoreBase:
    """What every store part shares: where time comes from."""

    def _now(self) -> float:
        """Wall time; the memory store reads its injected clock instead, so tests can move time forward."""
        return time.time()


_OPEN = frozenset({Status.queued.value, Status.classified.value})


class TurnWrites(StoreBase):
    """The status transitions of a turn, written the same way by both stores.

    Each store supplies ``_update`` (atomic: writes only when the turn's status is one of ``only_from``) and the
    pending index (``mark_working``/``drop_pending``). Transitions only go forward, and the first writer wins: a
    duplicate task racing the original can never turn ``done`` back into ``classified`` or replace a stored reply.
    """

    def _update(
        self,
        message_id: str,
        fields: dict[str, str],
        only_from: frozenset[str] | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        """Write ``fields`` on the turn (only when its status is in ``only_from``, if given), append ``event``
        (type, data) to its stream in the same step (a terminal one also takes the turn out of the pending index),
        and refresh the expiry of the turn, its conversation and its stream; True when written.
        :class:`UnknownMessage` when not stored."""
        raise NotImplementedError

    def mark_working(self, message_id: str) -> None:
        raise NotImplementedError

    def drop_pending(self, message_id: str) -> None:
        raise NotImplementedError

    def mark_enqueued(self, message_id: str) -> None:
        self._update(message_id, {"enqueued_at": str(self._now())})

    def mark_classified(self, message_id: str, sentiment: Sentiment, model: str) -> bool:
        fields = {
            "status": Status.classified.value,
            "sentiment": sentiment.model_dump_json(),
            "model": model,
            "classified_at": str(self._now()),
        }
        event = (events.CLASSIFIED, sentiment.model_dump(mode="json"))
        written = self._update(message_id, fields, only_from=frozenset({Status.queued.value}), event=event)
        self.mark_working(message_id)
        return written

    def mark_done(
        self,
        message_id: str,
        reply: str,
        model: str,
        error: str | None = None,
        context: list[str] | None = None,
        timing: dict[str, float] | None = None,
    ) -> bool:
        event = (events.DONE, {"reply": reply, "context": context, "model": model, "error": error, "timing": timing})
        fields = done_fields(reply, model, error, context, self._now())
        written = self._update(message_id, fields, only_from=_OPEN, event=event)
        self.drop_pending(message_id)
        return written

    def mark_failed(self, message_id: str, reason: str) -> bool:
        fields = {"status": Status.failed.value, "error": reason, "done_at": str(self._now())}
        written = self._update(message_id, fields, only_from=_OPEN, event=(events.FAILED, {"reason": reason}))
        self.drop_pending(message_id)
        return written
