"""The producer library: what a web backend calls. Fire and forget; never imports torch or transformers.

    from producer import Producer
    p = Producer()                                     # settings from ALLINONE_* environment
    mid = p.submit("conv-42", "The room was lovely")  # returns at once: stored as queued, task on the queue
    p.wait(mid, timeout=30)                           # optional: block until the worker finished it
    p.conversation("conv-42")                         # every turn, in submission order
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from worker.contract import send_turn
from worker.errors import StoreUnavailable, TurnFailed, WaitTimeout
from worker.schemas import Conversation, Status, Turn, new_message_id, validate_id, validate_text
from worker.settings import Settings, get_settings
from worker.store import ResultsStore, store_from_settings


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app that only sends: same configuration as the worker, no task modules (so no torch)."""
    app = Celery("allinone-producer")
    app.config_from_object("celeryconfig")
    if settings is not None:
        app.conf.broker_url = settings.redis_url
    return app


class Producer:
    """Submit messages and read results. Thread-safe; keep one per process."""

    def __init__(
        self, settings: Settings | None = None, store: ResultsStore | None = None, celery: Celery | None = None
    ) -> None:
        self.settings = settings or get_settings()
        self.store = store or store_from_settings(self.settings)
        self.celery = celery or make_celery(self.settings)

    # ----------------------------------------------------------------------------------------------- write
    def submit(
        self,
        conversation_id: str,
        text: Any,
        message_id: str | None = None,
        *,
        queue: str | None = None,
    ) -> str:
        """Store the message as a queued turn and put its task on the queue; return its message id at once.

        Idempotent by ``message_id``: submitting the same id again returns it without a second turn or task
        (unless the first submit was stored but never reached the queue, which this call then repairs).
        Raises :class:`InvalidMessage` for bad input and :class:`StoreUnavailable` when Redis does not answer
        within the retry bound; on any error nothing is reported as submitted.
        """
        s = self.settings
        conversation_id = validate_id(conversation_id, "conversation_id", s.max_id_chars)
        message_id = validate_id(message_id or new_message_id(), "message_id", s.max_id_chars)
        text = validate_text(text, s.max_message_chars)
        queue = queue or s.live_queue
        turn, created = self.store.create_turn(conversation_id, message_id, text, queue=queue)
        if created or (turn.enqueued_at is None and not turn.status.terminal):
            self._enqueue(turn, queue)
        return message_id

    def _enqueue(self, turn: Turn, queue: str) -> None:
        try:
            send_turn(self.celery, turn.message_id, turn.conversation_id, queue)
        except OperationalError as e:
            raise StoreUnavailable(
                f"the broker did not take message {turn.message_id!r} (stored as queued; submit it again with "
                f"the same message_id to enqueue it): {e}"
            ) from e
        self.store.mark_enqueued(turn.message_id)

    # ------------------------------------------------------------------------------------------------ read
    def turn(self, message_id: str) -> Turn:
        """One turn by message id (:class:`UnknownMessage` if none)."""
        return self.store.get_turn(validate_id(message_id, "message_id", self.settings.max_id_chars))

    def conversation(self, conversation_id: str) -> Conversation:
        """Every turn of a conversation, in submission order (:class:`UnknownConversation` if none)."""
        return self.store.get_conversation(
            validate_id(conversation_id, "conversation_id", self.settings.max_id_chars)
        )

    def wait(
        self, message_id: str, timeout: float = 60.0, *, poll: float = 0.05, raise_on_failure: bool = False
    ) -> Turn:
        """Block until the turn is ``done`` or ``failed`` and return it.

        Raises :class:`WaitTimeout` after ``timeout`` seconds, :class:`UnknownMessage` for an id never submitted,
        and with ``raise_on_failure`` :class:`TurnFailed` for a failed turn.
        """
        deadline = time.monotonic() + timeout
        delay = poll
        while True:
            turn = self.turn(message_id)
            if turn.status.terminal:
                if raise_on_failure and turn.status is Status.failed:
                    raise TurnFailed(turn.error or "failed")
                return turn
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"message {message_id!r} is still {turn.status.value} after {timeout:g} s")
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 1.0)  # quick for short tasks, gentle on Redis for long ones
