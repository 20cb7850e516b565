"""The producer library: what a web backend calls. Fire and forget; never imports torch or transformers.

    from producer import Producer
    p = Producer()                                     # settings from ALLINONE_* environment
    mid = p.submit("conv-42", "The room was lovely")  # returns at once: stored as queued, task on the queue
    for event in p.events(mid):                       # optional: hear it happen (queued, classified, token..., done)
        print(event.type, event.data)
    p.wait(mid, timeout=30)                           # optional: block until the worker finished it
    p.conversation("conv-42")                         # every turn, in submission order

asyncio code uses :class:`producer.AsyncProducer`, which has the same methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from producer import core
from worker.contract import send_turn
from worker.events import Event
from worker.schemas import Conversation, Turn, validate_id
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
        sub = core.submission(self.settings, conversation_id, text, message_id, queue)
        turn, created = self.store.create_turn(sub.conversation_id, sub.message_id, sub.text, queue=sub.queue)
        if core.needs_enqueue(turn, created):
            self._enqueue(turn, sub.queue)
        return sub.message_id

    def _enqueue(self, turn: Turn, queue: str) -> None:
        try:
            send_turn(self.celery, turn.message_id, turn.conversation_id, queue)
        except OperationalError as e:
            raise core.broker_error(turn.message_id, e) from e
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

    def events(self, message_id: str, after: str = "0", *, timeout: float | None = None) -> Iterator[Event]:
        """The turn's events after event id ``after`` (``"0"``: all of them), as they happen, until the last
        (``done`` or ``failed``). Blocks on the stream (``XREAD``), never polls; resume with the last id seen.

        Raises :class:`UnknownMessage` for an id never submitted and :class:`WaitTimeout` after ``timeout``
        seconds (``None``: no limit).
        """
        turn = self.turn(message_id)
        yield from self._follow(message_id, core.Follow(after, timeout, finished=turn.status.terminal))

    def _follow(self, message_id: str, follow: core.Follow) -> Iterator[Event]:
        while not follow.done:
            if follow.expired:
                raise core.wait_timeout(message_id, self.turn(message_id), follow.timeout or 0)
            finished = follow.finished
            batch = self.store.read_events(message_id, follow.after, block=follow.block())
            if not batch:
                if finished:
                    follow.ended()
                elif (self.turn(message_id)).status.terminal:
                    follow.finished = True  # one more read, without blocking: its last event may be there now
                continue
            yield from follow.take(batch)

    def wait(
        self, message_id: str, timeout: float = 60.0, *, poll: float | None = None, raise_on_failure: bool = False
    ) -> Turn:
        """Block until the turn is ``done`` or ``failed`` and return it.

        Waits on the turn's event stream for its last event, then reads the turn (the source of truth): a few
        Redis calls however long it takes. Raises :class:`WaitTimeout` after ``timeout`` seconds,
        :class:`UnknownMessage` for an id never submitted, and with ``raise_on_failure`` :class:`TurnFailed` for a
        failed turn. ``poll`` is not used any more (this never polls); it is accepted for callers that pass it.
        """
        turn = self.turn(message_id)
        if not turn.status.terminal:
            for _ in self._follow(message_id, core.Follow("0", timeout)):
                pass
            turn = self.turn(message_id)
        return core.finished(turn, raise_on_failure)
