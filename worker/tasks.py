"""The Celery tasks: thin. Validate the payload, call a step (worker.steps: engine + store), decide retry or give up.

A message's life: ``allinone.classify`` -> (Celery chain) -> ``allinone.reply``; bulk jobs send
``allinone.classify_batch`` with many message ids (one batched forward pass), which with ``reply=True`` then sends
one ``allinone.reply`` per message on the queue it came from. Payloads are plain JSON:
``{"message_id": str, "conversation_id": str}``; the text is in the results store.

Errors:
- a malformed payload (poison message) goes to the dead-letter list with the reason and is never retried;
- a permanent error (bad text, unknown turn) is recorded on the turn as ``failed`` with the reason, and the chain
  stops there;
- a transient one (Redis away, an earlier turn still in flight) is retried with backoff;
- anything unexpected is retried twice, then recorded as ``failed``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task, signals
from celery.exceptions import Ignore, Retry

from worker import contract, events, runtime, steps
from worker.app import app
from worker.errors import NotReady, PermanentError, TransientError, UnknownMessage
from worker.schemas import HeldTask, Status, TaskPayload, parse_payload
from worker.settings import get_settings

log = logging.getLogger(__name__)

UNEXPECTED_RETRIES = 2
TRANSIENT_RETRIES = 12


class AllInOneTask(Task):
    """Base of our tasks: whatever escapes the guard below still leaves a trace in the dead-letter list."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # Reached when retries ran out (a transient error that never cleared) or the message did not fit the task
        # (wrong arity): the turn, if there is one, must not stay "queued" for ever.
        reason = f"{type(exc).__name__}: {exc}"
        try:
            store = runtime.store()
            try:
                payload = parse_payload(args[0] if args else None)
            except PermanentError:
                store.dead_letter({"task": self.name, "id": task_id, "args": args, "kwargs": kwargs}, reason)
            else:
                _record_failure(store, payload, args[0], self.name, f"gave up: {reason}")
        except Exception:  # pragma: no cover - Redis away: the log line is all we can leave
            log.exception("could not record failed task %s", task_id)


def _backoff(retries: int) -> float:
    return min(60.0, 1.0 * 2**retries)


def _guarded(task: Task, raw: Any, step: Callable[[TaskPayload], Any]) -> Any:
    store = runtime.store()
    try:
        payload = parse_payload(raw)
    except PermanentError as e:
        log.error("%s: poison message dead-lettered: %s", task.name, e)
        store.dead_letter({"task": task.name, "payload": raw}, str(e))
        raise Ignore() from None
    runtime.count_task()
    return _run(task, payload.message_id, lambda: step(payload),
                lambda reason: _record_failure(store, payload, raw, task.name, reason))


def _run(task: Task, what: str, step: Callable[[], Any], fail: Callable[[str], None]) -> Any:
    """Run a task's step; decide retry or give up. ``fail(reason)`` records a failure that will not be retried."""
    try:
        return step()
    except NotReady as e:
        # Waiting for an earlier turn is not a failure: poll again soon (bounded by ALLINONE_ORDER_WAIT_SECONDS).
        log.info("%s %s: %s", task.name, what, e)
        # Backoff 0.5 s doubling to 5 s: quick when the earlier turn is about to finish, little churn when not.
        # (max_retries=None here means "the task's own", which is None: unbounded; the order wait bounds it.)
        raise task.retry(countdown=min(5.0, 0.5 * 2**task.request.retries), max_retries=None, exc=e) from None
    except TransientError as e:
        log.warning("%s %s: transient error, retry %d: %s", task.name, what, task.request.retries, e)
        raise task.retry(countdown=_backoff(task.request.retries), max_retries=TRANSIENT_RETRIES, exc=e) from None
    except PermanentError as e:
        log.error("%s %s: failed: %s", task.name, what, e)
        fail(str(e))
        raise Ignore() from None
    except (Ignore, Retry):
        raise
    except Exception as e:
        if task.request.retries < UNEXPECTED_RETRIES:
            log.exception("%s %s: unexpected error, will retry", task.name, what)
            raise task.retry(countdown=_backoff(task.request.retries), max_retries=UNEXPECTED_RETRIES, exc=e) from None
        log.exception("%s %s: unexpected error, giving up", task.name, what)
        fail(f"internal error: {type(e).__name__}: {e}")
        raise Ignore() from None


def _record_failure(store: Any, payload: TaskPayload, raw: Any, task: str, reason: str) -> None:
    try:
        turn = store.get_turn(payload.message_id)
        if not turn.status.terminal:
            store.mark_failed(payload.message_id, reason)
    except UnknownMessage:
        store.dead_letter({"task": task, "payload": raw}, reason)


@app.task(name=contract.CLASSIFY, bind=True, base=AllInOneTask, max_retries=None)
def classify(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Sentiment of one message; returns the payload, which the chain hands to ``allinone.reply``."""

    def step(p: TaskPayload) -> dict[str, Any]:
        store = runtime.store()
        store.bump_attempts(p.message_id)
        steps.classify_turn(runtime.engine(), store, p.message_id, get_settings().max_message_chars)
        return p.model_dump()

    return _guarded(self, payload, step)


@app.task(name=contract.REPLY, bind=True, base=AllInOneTask, max_retries=None)
def reply(self: Task, payload: dict[str, Any]) -> None:
    """The chat reply of one message, seeing the conversation's earlier turns."""

    def step(p: TaskPayload) -> None:
        s = get_settings()
        steps.reply_turn(
            runtime.engine(), runtime.store(), p.message_id, s.order_wait_seconds, events.TokenPolicy.from_settings(s)
        )

    _guarded(self, payload, step)


@app.task(name=contract.CLASSIFY_BATCH, bind=True, base=AllInOneTask, max_retries=None)
def classify_batch(self: Task, payloads: list[dict[str, Any]], reply: bool = False) -> dict[str, str]:
    """Sentiment of many messages in batched forward passes (bulk jobs).

    ``reply=False``: the turns end ``done`` with no reply. ``reply=True``: one ``allinone.reply`` per classified
    turn is sent on the queue this batch came from, so a live message still waits for one task at most."""
    store = runtime.store()
    if not isinstance(payloads, list):
        store.dead_letter({"task": self.name, "payload": payloads}, "classify_batch takes a list of payloads")
        raise Ignore()
    good: list[TaskPayload] = []
    for raw in payloads:
        try:
            good.append(parse_payload(raw))
        except PermanentError as e:
            store.dead_letter({"task": self.name, "payload": raw}, str(e))
    if not good:
        raise Ignore()
    runtime.count_task()
    mids = [p.message_id for p in good]

    def step() -> dict[str, str]:
        engine = runtime.engine()
        outcome = steps.classify_turns(engine, store, mids, get_settings().max_message_chars)
        if not reply:
            steps.finish_sentiment_only(store, mids, engine.model_id)
            return outcome
        # Classified now or by an earlier delivery of this batch (whose replies may not all have been sent):
        # a reply sent twice finds the turn done the second time and does nothing.
        settings = get_settings()
        queue = (self.request.delivery_info or {}).get("routing_key") or settings.bulk_queue
        waiting = {t.message_id for t in store.get_turns(mids) if t is not None and t.status is Status.classified}
        policy = events.TokenPolicy.from_settings(settings)
        if settings.reply_batch_size > 1 and (policy is None or not policy.streams(queue)):
            # Replies decoded together where their conversations allow; the rest go one by one, as before.
            waiting = set(steps.reply_turns(engine, store, sorted(waiting), settings.reply_batch_size))
        contract.send_replies(self.app, [p for p in good if p.message_id in waiting], queue)
        return outcome

    def fail(reason: str) -> None:
        # Every turn of the batch that is not finished fails with the reason, not only the first.
        for p in good:
            _record_failure(store, p, p.model_dump(), self.name, reason)

    return _run(self, f"[{len(mids)} messages from {mids[0]}]", step, fail)


# ----------------------------------------------------------------------------------------------- lifecycle


def held_task(request: Any) -> HeldTask:
    """What a worker holds once it received a task message: enough to put it back, or send its turns again."""
    args = list(request.args or [])
    if request.name == contract.CLASSIFY_BATCH:
        payloads = args[0] if args and isinstance(args[0], list) else args
        reply = bool((request.kwargs or {}).get("reply", False))
    else:
        payloads, reply = args[:1], False
    tag = getattr(request.message, "delivery_tag", None)
    return HeldTask(
        task_id=request.id, task=request.name, delivery_tag=str(tag) if tag is not None else None,
        queue=(request.delivery_info or {}).get("routing_key") or get_settings().live_queue,
        payloads=payloads, reply=reply, received_at=time.time(),
    )


@signals.task_received.connect
def _hold(request: Any, **_: Any) -> None:
    # Sent when the worker takes a message, also one it keeps until its countdown is due (a reply waiting for an
    # earlier turn): from now on, if this worker dies, a live one puts the message back (worker.recovery).
    runtime.hold(held_task(request))


@signals.task_postrun.connect
def _release(task_id: str, **_: Any) -> None:
    # Sent after every outcome, and after the chain's next task or a retry was sent: the work is in the broker
    # again or finished, not held here.
    runtime.release(task_id)


@signals.worker_shutdown.connect
def _stop(**_: Any) -> None:
    runtime.stop()


@signals.worker_process_init.connect
def _load_model(**_: Any) -> None:
    # Sent in the process that runs tasks: by the solo pool in the worker itself (after logging is set up, before
    # the first message is taken), by prefork in each child. The model is loaded here, once, never in a task.
    try:
        runtime.start()
    except Exception as e:
        # Celery logs and swallows exceptions from signal handlers; a worker without its model must not go on
        # taking messages, so stop the process with the reason.
        log.critical("worker cannot start: %s", e)
        raise SystemExit(3) from e
