"""Records at the edges: what a producer submits, what crosses the broker, what the store keeps.

Pydantic lives here only; plain JSON crosses the broker (``TaskPayload.model_dump()``).
"""

from __future__ import annotations

import re
import time
import uuid
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.errors import InvalidMessage

Label = Literal["positive", "negative"]

# Ids end up in Redis keys and in logs: printable, no whitespace, no control characters. Anything a web
# backend uses as an id (uuids, "user:42/chat:7", e-mail-like strings) passes.
_ID_RE = re.compile(r"^[^\s\x00-\x1f\x7f]+$")


class Status(str, Enum):
    """Life of a turn: queued -> classified -> done, or failed (with a reason) at any step."""

    queued = "queued"
    classified = "classified"
    done = "done"
    failed = "failed"

    @property
    def terminal(self) -> bool:
        return self in (Status.done, Status.failed)


class Sentiment(BaseModel):
    """A label and the model's confidence in it (probability mass of the label among the two)."""

    model_config = ConfigDict(frozen=True)

    label: Label
    confidence: float = Field(ge=0.0, le=1.0)
    method: str = Field("prompt", description="What produced the label: prompt, prompt+head, ...")

    @classmethod
    def from_p_positive(cls, p_positive: float, method: str = "prompt") -> Sentiment:
        """The label of a probability of "positive": positive from 0.5 up, with the larger of p and 1 - p."""
        p = float(p_positive)
        label: Label = "positive" if p >= 0.5 else "negative"
        return cls(label=label, confidence=round(max(p, 1 - p), 6), method=method)


class Turn(BaseModel):
    """One user message and what the worker made of it. Stored as a Redis hash (see ``worker.store``)."""

    message_id: str
    conversation_id: str
    seq: int = Field(ge=0, description="Position in the conversation, from 0, in submission order.")
    text: str
    status: Status = Status.queued
    sentiment: Sentiment | None = None
    reply: str | None = None
    context: list[str] | None = Field(
        None, description="Message ids of the earlier turns the reply's prompt held, oldest first."
    )
    error: str | None = None
    model: str | None = None
    queue: str | None = None
    created_at: float = Field(default_factory=time.time)
    enqueued_at: float | None = None
    classified_at: float | None = None
    done_at: float | None = None
    attempts: int = 0
    reply_attempts: int = Field(
        0, description="Reply attempts started on this turn; above 1 after a retry or a crash (its stream says so)."
    )

    def public(self) -> dict[str, Any]:
        """The JSON a user sees (``producer show``/``wait``)."""
        return self.model_dump(mode="json")


class Conversation(BaseModel):
    conversation_id: str
    turns: list[Turn]

    def public(self) -> dict[str, Any]:
        return {"conversation_id": self.conversation_id, "turns": [t.public() for t in self.turns]}


class TaskPayload(BaseModel):
    """What one task message carries. The store holds the text; the payload only points at the turn."""

    model_config = ConfigDict(extra="forbid")

    message_id: str
    conversation_id: str


class HeldTask(BaseModel):
    """A task message a worker holds: running it, or keeping it until its countdown is due (a reply waiting for an
    earlier turn). Recorded in the store when the worker receives it and dropped when its task ends, so that if
    the worker dies a live one can put it back at once (``worker.recovery``)."""

    task_id: str
    task: str = Field(description="The task name (worker.contract).")
    delivery_tag: str | None = Field(None, description="The broker's tag of the delivery: how to put it back.")
    queue: str
    payloads: list[Any] = Field(description="The task's payload(s) as received: one, or a bulk batch's list.")
    reply: bool = Field(False, description="A bulk batch's flag: its worker sends each turn's reply.")
    received_at: float

    def message_ids(self) -> list[str]:
        """The turns this task works on (payloads that do not name one are left out)."""
        return [p["message_id"] for p in self.payloads if isinstance(p, dict) and isinstance(p.get("message_id"), str)]


def new_message_id() -> str:
    return uuid.uuid4().hex


def validate_id(value: Any, what: str, max_chars: int) -> str:
    """An id as a clean string, or :class:`InvalidMessage` saying what is wrong."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidMessage(f"{what} is empty")
    if len(value) > max_chars:
        raise InvalidMessage(f"{what} is {len(value)} characters long; the limit is {max_chars}")
    if not _ID_RE.match(value):
        raise InvalidMessage(f"{what} {value!r} has whitespace or control characters")
    return value


def validate_text(value: Any, max_chars: int) -> str:
    """The message text, checked: a non-blank ``str`` of valid Unicode, at most ``max_chars`` characters.

    Bytes are accepted when they are valid UTF-8 (a backend may hand us a raw body); anything else is refused.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidMessage(f"text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(value, str):
        raise InvalidMessage(f"text must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidMessage("text is empty")
    if len(value) > max_chars:
        raise InvalidMessage(
            f"text is {len(value)} characters long; the limit is {max_chars} (ALLINONE_MAX_MESSAGE_CHARS)"
        )
    try:
        value.encode("utf-8")  # lone surrogates (from a bad JSON escape) cannot be stored or tokenized
    except UnicodeEncodeError:
        raise InvalidMessage("text holds unpaired surrogates: not valid Unicode") from None
    return value


def parse_payload(raw: Any) -> TaskPayload:
    """A task payload from the broker, or :class:`InvalidMessage` (a poison message: never retried)."""
    try:
        return TaskPayload.model_validate(raw)
    except ValidationError as e:
        raise InvalidMessage(f"malformed task payload: {e.errors(include_url=False)}") from None
