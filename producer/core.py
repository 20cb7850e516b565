"""What the blocking :class:`~producer.Producer` and the asyncio :class:`~producer.AsyncProducer` share, with no
I/O: how a submission is checked, when a turn's task must be sent, how a finished turn is returned, and how a
reader follows a turn's event stream (where to resume, how long to block, when it is over).

Each producer only does the I/O around these, with its own client; so both accept and refuse the same input with
the same errors, and a turn submitted through either is the same turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.errors import StoreUnavailable, TurnFailed, WaitTimeout
from worker.events import Event, check_event_id
from worker.schemas import Status, Turn, new_message_id, validate_id, validate_text
from worker.settings import Settings

# A follower with nothing to read checks the turn itself this often: a turn finished by a worker that writes no
# events (one older than the event streams) still ends the wait.
IDLE_CHECK_SECONDS = 5.0


@dataclass(frozen=True)
class Submission:
    """A checked message, ready to be stored as a turn."""

    conversation_id: str
    message_id: str
    text: str
    queue: str


def submission(
    settings: Settings, conversation_id: Any, text: Any, message_id: Any = None, queue: str | None = None
) -> Submission:
    """The message checked (:class:`InvalidMessage` says what is wrong), with a new id when it has none."""
    return Submission(
        conversation_id=validate_id(conversation_id, "conversation_id", settings.max_id_chars),
        message_id=validate_id(message_id or new_message_id(), "message_id", settings.max_id_chars),
        text=validate_text(text, settings.max_message_chars),
        queue=queue or settings.live_queue,
    )


def needs_enqueue(turn: Turn, created: bool) -> bool:
    """A new turn is sent; a turn submitted again is sent again only when its first submit stored it but never
    reached the broker (and it is not finished)."""
    return created or (turn.enqueued_at is None and not turn.status.terminal)


def broker_error(message_id: str, error: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        f"the broker did not take message {message_id!r} (stored as queued; submit it again with the same "
        f"message_id to enqueue it): {error}"
    )


def finished(turn: Turn, raise_on_failure: bool) -> Turn:
    """What ``wait`` returns for a finished turn (or :class:`TurnFailed` with its reason, when asked)."""
    if raise_on_failure and turn.status is Status.failed:
        raise TurnFailed(turn.error or "failed")
    return turn


def wait_timeout(message_id: str, turn: Turn, timeout: float) -> WaitTimeout:
    return WaitTimeout(f"message {message_id!r} is still {turn.status.value} after {timeout:g} s")


class Follow:
    """Following one turn's stream: the id to read after, how long the next read may block, and the end.

    ``take`` the events each read returns. When a blocking read returns nothing, the reader checks the turn: once
    it is ``finished``, the next read does not block (its terminal event may have come in between), and when that
    read is empty too the follow has ``ended`` (a turn finished without a terminal event: written before the
    streams, or its stream expired).
    """

    def __init__(
        self,
        after: str = "0",
        timeout: float | None = None,
        finished: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.after = check_event_id(str(after))
        self.timeout = timeout
        self.finished = finished
        self.clock = clock
        self.deadline = None if timeout is None else clock() + timeout
        self.done = False

    def block(self) -> float | None:
        """How long the next read may wait (``None``: not at all, the turn is finished)."""
        if self.finished:
            return None
        if self.deadline is None:
            return IDLE_CHECK_SECONDS
        return min(IDLE_CHECK_SECONDS, max(0.0, self.deadline - self.clock()))

    @property
    def expired(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    def take(self, batch: list[Event]) -> list[Event]:
        """The events of a read a reader gets: all of them up to and including a terminal one."""
        out: list[Event] = []
        for event in batch:
            out.append(event)
            self.after = event.id
            if event.terminal:
                self.done = True
                break
        return out

    def ended(self) -> None:
        self.done = True
