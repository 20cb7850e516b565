"""A turn as a flat hash of strings, both ways: one encoding for both stores so they cannot drift apart.

The memory store keeps its turns in this encoding too, so the round trip the Redis store does is exercised in the
unit tests as well.
"""

from __future__ import annotations

import json
from typing import Any

from worker.errors import MessageIdConflict
from worker.schemas import Status, Turn

# Fields that are not scalars travel as JSON inside the hash.
_JSON_FIELDS = ("sentiment", "context")


def turn_to_fields(turn: Turn) -> dict[str, str]:
    """The hash of a turn (fields that are ``None`` are left out)."""
    data = turn.model_dump(mode="json", exclude_none=True)
    for k in _JSON_FIELDS:
        if k in data:
            data[k] = json.dumps(data[k])
    return {k: str(v) if not isinstance(v, str) else v for k, v in data.items()}


def turn_from_fields(fields: dict[str, str]) -> Turn:
    """The turn a hash holds."""
    data: dict[str, Any] = dict(fields)
    for k in _JSON_FIELDS:
        if k in data:
            data[k] = json.loads(data[k])
    return Turn.model_validate(data)


def done_fields(reply: str, model: str, error: str | None, context: list[str] | None, at: float) -> dict[str, str]:
    """The fields a finished turn gets."""
    fields = {"status": Status.done.value, "reply": reply, "model": model, "done_at": str(at)}
    if error:
        fields["error"] = error
    if context is not None:
        fields["context"] = json.dumps(context)
    return fields


def check_same(turn: Turn, conversation_id: str, text: str) -> None:
    """A message id submitted again must carry the same conversation and text, or it is another message."""
    if turn.conversation_id != conversation_id or turn.text != text:
        where = (
            f"to conversation {turn.conversation_id!r}"
            if turn.conversation_id != conversation_id
            else "with another text"
        )
        raise MessageIdConflict(f"message id {turn.message_id!r} was already submitted {where}")
