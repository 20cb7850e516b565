"""AsyncProducer on a real Redis: the same turns, values and errors as Producer, a wait that does not poll, and an
outage of Redis or of the broker that fails fast without ever blocking the event loop."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from producer.aio import AsyncProducer, make_async_celery
from producer.client import Producer
from worker.errors import InvalidMessage, MessageIdConflict, StoreUnavailable, WaitTimeout
from worker.schemas import Sentiment, Status
from worker.settings import Settings
from worker.store import RedisStore
from worker.store.aio import AsyncRedisStore
from worker.testing import RedisServer, free_port

pytestmark = pytest.mark.integration


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())


class LoopLag:
    """How late a 10 ms ticker wakes up: a blocked event loop shows as lag."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - t0 - 0.01)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()


def test_async_and_blocking_producers_make_the_same_turns_and_refuse_the_same_input(tiny_worker, redis_base_url):
    settings = Settings(redis_url=redis_base_url)
    blocking = Producer(settings=settings)
    c = f"c-{uuid.uuid4().hex[:6]}"

    async def scenario() -> None:
        async with AsyncProducer(settings=settings) as producer:
            # Given turns submitted through both producers into one conversation
            first = await producer.submit(c, "The room was lovely")
            second = blocking.submit(c, "and the staff friendly")
            third = await producer.submit(c, "but the wifi dropped", message_id="m-3")
            assert await producer.submit(c, "but the wifi dropped", message_id="m-3") == third  # idempotent
            # Then they are one conversation, in order, finished by the worker
            turn = await producer.wait(third, timeout=60)
            assert turn.status is Status.done and turn.seq == 2
            conversation = await producer.conversation(c)
            assert [t.message_id for t in conversation.turns] == [first, second, third]
            assert conversation == blocking.conversation(c)
            # the events are the blocking producer's too
            assert [e async for e in producer.events(first)] == list(blocking.events(first))
            # and the errors are the same classes with the same messages
            for call in (
                lambda p: p.submit(c, "   "),
                lambda p: p.submit("has space", "x"),
                lambda p: p.submit(c, "another text", message_id="m-3"),
                lambda p: p.turn("never-submitted"),
                lambda p: p.conversation("never-used"),
            ):
                with pytest.raises(Exception) as sync_error:
                    call(blocking)
                with pytest.raises(type(sync_error.value), match=re.escape(str(sync_error.value))):
                    await call(producer)
            with pytest.raises(InvalidMessage):
                await producer.submit(c, b"\xff\xfe")
            with pytest.raises(MessageIdConflict):
                await producer.submit("other", "The room was lovely", message_id=first)

    run(scenario)


class CountingAsyncRedis(aioredis.Redis):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    async def execute_command(self, *args, **options):
        self.calls.append(str(args[0]))
        return await super().execute_command(*args, **options)


def test_async_wait_blocks_on_the_stream_and_times_out_cleanly(redis_url):
    writer = RedisStore.from_url(redis_url)
    writer.create_turn("c1", "m1", "hello")
    writer.create_turn("c1", "m2", "nobody answers this one")
    threading.Timer(1.0, writer.mark_classified, ("m1", Sentiment(label="negative", confidence=0.7), "m")).start()
    threading.Timer(1.5, writer.mark_done, ("m1", "the reply", "m")).start()

    async def scenario() -> None:
        client = CountingAsyncRedis.from_url(redis_url, decode_responses=True)
        settings = Settings(redis_url=redis_url)
        async with AsyncProducer(settings=settings, store=AsyncRedisStore(client)) as producer:
            with LoopLag() as lag:
                turn = await producer.wait("m1", timeout=30)
            assert turn.reply == "the reply"
            assert client.calls == ["HGETALL", "XREAD", "XREAD", "XREAD", "HGETALL"]
            assert lag.worst < 0.05
            t0 = time.monotonic()
            with pytest.raises(WaitTimeout, match="still queued after 0.5 s"):
                await producer.wait("m2", timeout=0.5)
            assert time.monotonic() - t0 < 1.5

    run(scenario)


def test_with_redis_stopped_calls_fail_fast_and_the_loop_never_blocks():
    server = RedisServer().start()
    settings = Settings(redis_url=server.url)

    async def scenario() -> None:
        async with AsyncProducer(settings=settings) as producer:
            mid = await producer.submit("c1", "before the outage")
            server.stop()
            with LoopLag() as lag:
                for call in (
                    lambda: producer.submit("c1", "during the outage"),
                    lambda: producer.turn(mid),
                    lambda: producer.conversation("c1"),
                    lambda: producer.ping(),
                    lambda: producer.wait(mid, timeout=5),
                ):
                    t0 = time.perf_counter()
                    with pytest.raises(StoreUnavailable):
                        await call()
                    assert time.perf_counter() - t0 < 0.1
            assert lag.worst < 0.05

    try:
        run(scenario)
    finally:
        server.stop()


def test_with_the_broker_away_a_submit_fails_within_its_bound_and_other_requests_go_on(redis_url):
    # Given a store that answers and a broker that does not (a port nobody listens on)
    settings = Settings(redis_url=redis_url, publish_timeout_seconds=1.0)
    celery = make_async_celery(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))

    async def scenario() -> None:
        async with AsyncProducer(settings=settings, celery=celery) as producer:
            with LoopLag() as lag:
                # When a submit cannot reach the broker
                submit = asyncio.create_task(producer.submit("c1", "hello", message_id="m1"))
                # Then, meanwhile, other requests are answered at once
                for _ in range(20):
                    t0 = time.perf_counter()
                    assert await producer.ping()
                    assert time.perf_counter() - t0 < 0.1
                    await asyncio.sleep(0.02)
                t0 = time.perf_counter()
                with pytest.raises(StoreUnavailable, match="submit it again with the same message_id"):
                    await submit
            # and the submit itself gave up within its bound, leaving the turn stored for a retry
            assert time.perf_counter() - t0 < 2.0
            assert lag.worst < 0.05
            turn = await producer.turn("m1")
            assert turn.status is Status.queued and turn.enqueued_at is None

    run(scenario)
