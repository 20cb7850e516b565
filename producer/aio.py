"""The producer for asyncio web frameworks: :class:`AsyncProducer`, the same methods as :class:`Producer`, awaited.

    from producer import AsyncProducer
    producer = AsyncProducer()                                  # one per process; await producer.aclose() at exit
    mid = await producer.submit("conv-42", "The room was lovely")
    async for event in producer.events(mid):                    # queued, classified, token..., done
        ...
    turn = await producer.wait(mid, timeout=30)

Store reads and event streams go through ``redis.asyncio``. Celery has no asyncio client (a publish blocks while
kombu reconnects), so the publish runs on a small thread pool, bounded twice: kombu's own retries are few and
short, and the coroutine stops waiting after ``ALLINONE_PUBLISH_TIMEOUT_SECONDS``. Either way an outage is a
quick :class:`StoreUnavailable` for that request, never a stalled event loop for the others. Input checks and turn
creation are the blocking producer's (``producer.core``, the store's Lua script).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from producer import core
from producer.client import make_celery
from worker.contract import send_turn
from worker.events import Event
from worker.schemas import Conversation, Turn, validate_id
from worker.settings import Settings, get_settings
from worker.store.aio import AsyncRedisStore

# kombu's retries of one publish while the broker is away: a web request fails in about a second, not in minutes.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}


def make_async_celery(settings: Settings) -> Celery:
    """The sending Celery app of :func:`make_celery`, with a publish that gives up quickly."""
    app = make_celery(settings)
    app.conf.task_publish_retry_policy = PUBLISH_RETRY_POLICY
    app.conf.broker_connection_timeout = 1.0
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "socket_connect_timeout": 1.0,
        "socket_timeout": settings.publish_timeout_seconds,
    }
    return app


class AsyncProducer:
    """Submit messages and read results from asyncio code. One per process (it holds a connection pool and a few
    publish threads); close it with ``await producer.aclose()`` or ``async with``."""

    def __init__(
        self,
        settings: Settings | None = None,
        store: AsyncRedisStore | None = None,
        celery: Celery | None = None,
        publish_threads: int = 4,
    ) -> None:
        self.settings = settings or get_settings()
        self.store = store or AsyncRedisStore.from_settings(self.settings)
        self.celery = celery or make_async_celery(self.settings)
        self._publisher = ThreadPoolExecutor(max_workers=publish_threads, thread_name_prefix="allinone-publish")

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._publisher.shutdown(wait=False, cancel_futures=True)
        await self.store.aclose()

    # ----------------------------------------------------------------------------------------------- write
    async def submit(
        self, conversation_id: str, text: Any, message_id: str | None = None, *, queue: str | None = None
    ) -> str:
        """As :meth:`Producer.submit`: stored as a queued turn, task on the queue, its message id returned.

        Raises :class:`InvalidMessage` for bad input and :class:`StoreUnavailable` when Redis or the broker does
        not answer (quickly: a web request should fail and be retried, with the same ``message_id``)."""
        sub = core.submission(self.settings, conversation_id, text, message_id, queue)
        turn, created = await self.store.create_turn(sub.conversation_id, sub.message_id, sub.text, queue=sub.queue)
        if core.needs_enqueue(turn, created):
            await self._enqueue(turn, sub.queue)
        return sub.message_id

    async def _enqueue(self, turn: Turn, queue: str) -> None:
        loop = asyncio.get_running_loop()
        publish = loop.run_in_executor(
            self._publisher, send_turn, self.celery, turn.message_id, turn.conversation_id, queue
        )
        try:
            await asyncio.wait_for(publish, timeout=self.settings.publish_timeout_seconds)
        except (OperationalError, OSError, asyncio.TimeoutError) as e:
            reason = e if str(e) else f"no answer within {self.settings.publish_timeout_seconds:g} s"
            raise core.broker_error(turn.message_id, reason) from e
        await self.store.mark_enqueued(turn.message_id)

    # ------------------------------------------------------------------------------------------------ read
    async def turn(self, message_id: str) -> Turn:
        """One turn by message id (:class:`UnknownMessage` if none)."""
        return await self.store.get_turn(validate_id(message_id, "message_id", self.settings.max_id_chars))

    async def conversation(self, conversation_id: str) -> Conversation:
        """Every turn of a conversation, in submission order (:class:`UnknownConversation` if none)."""
        return await self.store.get_conversation(
            validate_id(conversation_id, "conversation_id", self.settings.max_id_chars)
        )

    async def events(
        self, message_id: str, after: str = "0", *, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """As :meth:`Producer.events`: the turn's events after ``after`` as they happen, until the last one."""
        turn = await self.turn(message_id)
        async for event in self._follow(message_id, core.Follow(after, timeout, finished=turn.status.terminal)):
            yield event

    async def _follow(self, message_id: str, follow: core.Follow) -> AsyncIterator[Event]:
        while not follow.done:
            if follow.expired:
                raise core.wait_timeout(message_id, await self.turn(message_id), follow.timeout or 0)
            finished = follow.finished
            batch = await self.store.read_events(message_id, follow.after, block=follow.block())
            if not batch:
                if finished:
                    follow.ended()
                elif (await self.turn(message_id)).status.terminal:
                    follow.finished = True  # one more read, without blocking: its last event may be there now
                continue
            for event in follow.take(batch):
                yield event

    async def wait(self, message_id: str, timeout: float = 60.0, *, raise_on_failure: bool = False) -> Turn:
        """As :meth:`Producer.wait`: block (without polling) until the turn is finished, and return it."""
        turn = await self.turn(message_id)
        if not turn.status.terminal:
            async for _ in self._follow(message_id, core.Follow("0", timeout)):
                pass
            turn = await self.turn(message_id)
        return core.finished(turn, raise_on_failure)

    async def ping(self) -> bool:
        """True when Redis answers (:class:`StoreUnavailable` otherwise)."""
        return await self.store.ping()
