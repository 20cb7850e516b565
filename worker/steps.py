"""The steps of a turn: what each task does, as plain functions over an engine and a store.

No Celery here, so each step is unit-testable as it is; ``worker.tasks`` wraps them.

Every step is idempotent by message id: a redelivered or duplicated task finds the turn already classified or
done and does nothing, so a conversation never shows a turn, a label or a reply twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from worker import events
from worker.errors import InvalidMessage, NotReady
from worker.schemas import Sentiment, Status, Turn, validate_text
from worker.store import ResultsStore

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the steps need of the engine (the real one, or a test double in step-only tests)."""

    model_id: str

    def classify(self, texts: list[str], batch_size: int | None = None) -> list[Sentiment]: ...

    def reply(self, history: list[tuple[str, str]], text: str, on_text: Any = None) -> Any: ...


def classify_turn(engine: EngineLike, store: ResultsStore, message_id: str, max_chars: int) -> Turn:
    """Label one turn. Returns the stored turn; a turn already past this step is returned untouched."""
    turn = store.get_turn(message_id)
    if turn.status is not Status.queued:
        log.info("classify %s: already %s, skipped", message_id, turn.status.value)
        return turn
    store.mark_working(message_id)
    try:
        validate_text(turn.text, max_chars)
    except InvalidMessage as e:
        store.mark_failed(message_id, f"invalid message: {e}")
        raise
    (sentiment,) = engine.classify([turn.text])
    store.mark_classified(message_id, sentiment, engine.model_id)
    return store.get_turn(message_id)


def classify_turns(
    engine: EngineLike, store: ResultsStore, message_ids: list[str], max_chars: int
) -> dict[str, str]:
    """Label many turns in batched forward passes (the bulk path). Returns {message_id: outcome}.

    A bad or missing turn does not sink the batch: it is marked failed (or reported missing) and the rest go on.
    """
    outcome: dict[str, str] = {}
    todo: list[Turn] = []
    for mid, turn in zip(message_ids, store.get_turns(message_ids), strict=True):
        if turn is None:
            outcome[mid] = "missing"
        elif turn.status is not Status.queued:
            outcome[mid] = "skipped"
        else:
            try:
                validate_text(turn.text, max_chars)
                todo.append(turn)
            except InvalidMessage as e:
                store.mark_failed(mid, f"invalid message: {e}")
                outcome[mid] = "failed"
    if todo:
        for turn, sentiment in zip(todo, engine.classify([t.text for t in todo]), strict=True):
            store.mark_classified(turn.message_id, sentiment, engine.model_id)
            outcome[turn.message_id] = "classified"
    return outcome


def finish_sentiment_only(store: ResultsStore, message_ids: list[str], model_id: str) -> None:
    """Bulk jobs that want no reply: a classified turn is done, with an empty reply."""
    for mid, turn in zip(message_ids, store.get_turns(message_ids), strict=True):
        if turn is not None and turn.status is Status.classified:
            store.mark_done(mid, "", model_id)


def history_for(store: ResultsStore, turn: Turn, order_wait_seconds: float, now: float | None = None) -> list[Turn]:
    """The earlier turns of the conversation a reply may see: all turns before this one, once they are finished.

    While an earlier turn is still in flight (another worker has it), raise :class:`NotReady` so the reply waits
    and its prompt holds exactly the turns before it. After ``order_wait_seconds`` we stop waiting for a turn
    that may never finish (its worker lost, its message expired) and go on with the finished ones.
    """
    conv = store.get_conversation(turn.conversation_id)
    earlier = [t for t in conv.turns if t.seq < turn.seq]
    pending = [t for t in earlier if not t.status.terminal]
    now = time.time() if now is None else now
    # The clock starts when this turn became ready for its reply, not when it was submitted: a long queue in front
    # of a conversation (a bulk backlog) must not count as "the earlier turn is lost".
    ready_since = turn.classified_at or turn.created_at
    if pending and now - ready_since < order_wait_seconds:
        store.mark_working(turn.message_id)  # waiting, not lost: keep it out of the stale sweep
        raise NotReady(
            f"turn {turn.seq} of {turn.conversation_id!r} waits for earlier turn(s) "
            f"{[t.seq for t in pending]} to finish"
        )
    return [t for t in earlier if t.status is Status.done]


def reply_turn(
    engine: EngineLike,
    store: ResultsStore,
    message_id: str,
    order_wait_seconds: float,
    tokens: events.TokenPolicy | None = None,
) -> Turn:
    """Write the chat reply of one turn, seeing the conversation's earlier turns; with ``tokens``, its text goes
    on the turn's event stream as it is written."""
    turn = store.get_turn(message_id)
    if turn.status.terminal:
        log.info("reply %s: already %s, skipped", message_id, turn.status.value)
        return turn
    history = history_for(store, turn, order_wait_seconds)
    store.mark_working(message_id)
    store.begin_reply(message_id)  # an earlier attempt's partial text is announced void (a `restart` event)
    stream = None
    if tokens is not None and tokens.streams(turn.queue):
        stream = events.TokenEvents(
            lambda text: store.append_event(message_id, events.TOKEN, {"text": text}), tokens.interval
        )
    reply = engine.reply([(t.text, t.reply or "") for t in history], turn.text, on_text=stream)
    if stream is not None:
        stream.flush()
    _store_reply(store, engine.model_id, message_id, history, reply, stream)
    return store.get_turn(message_id)


def _store_reply(store: ResultsStore, model_id: str, message_id: str, history: list[Turn], reply: Any,
                 stream: Any = None) -> None:
    # The engine keeps the most recent turns that fit the history budget: those are the prompt's context.
    kept = history[len(history) - reply.history_turns :] if reply.history_turns else []
    note = "reply cut at the time bound (ALLINONE_REPLY_TIMEOUT_SECONDS)" if reply.timed_out else None
    timing = {"first_token_at": reply.first_token_at, "new_tokens": reply.new_tokens, "seconds": reply.seconds,
              "prompt_tokens": reply.prompt_tokens, "cached_prompt_tokens": reply.cached_prompt_tokens}
    if stream is not None:
        # later than the first token when it is part of a character (CJK, emoji: two or three tokens each)
        timing["first_text_at"] = stream.first_text_at
    store.mark_done(message_id, reply.text, model_id, error=note, context=[t.message_id for t in kept], timing=timing)


def reply_turns(engine: Any, store: ResultsStore, message_ids: list[str], batch_size: int) -> list[str]:
    """Write the replies of many classified turns, up to ``batch_size`` decoded together (the bulk path).

    Only turns whose earlier turns are all finished are batched, one per conversation (a later turn's prompt
    needs the earlier one's reply); returns the ids of the classified turns left for one-by-one replies."""
    ready: list[tuple[Turn, list[Turn]]] = []
    left: list[str] = []
    seen: set[str] = set()
    turns = [t for t in store.get_turns(message_ids) if t is not None and t.status is Status.classified]
    for turn in sorted(turns, key=lambda t: (t.conversation_id, t.seq)):
        earlier = [t for t in store.get_conversation(turn.conversation_id).turns if t.seq < turn.seq]
        if turn.conversation_id in seen or any(not t.status.terminal for t in earlier):
            left.append(turn.message_id)
            continue
        seen.add(turn.conversation_id)
        ready.append((turn, [t for t in earlier if t.status is Status.done]))
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        for turn, _ in chunk:
            store.mark_working(turn.message_id)
            store.begin_reply(turn.message_id)
        replies = engine.reply_batch([([(t.text, t.reply or "") for t in h], turn.text) for turn, h in chunk])
        for (turn, history), reply in zip(chunk, replies, strict=True):
            _store_reply(store, engine.model_id, turn.message_id, history, reply)
    return left
