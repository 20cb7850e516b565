"""Talking to Redis: a client that rides out a Redis that went away for a while, and the one error it gives up
with (:class:`StoreUnavailable`, a transient error)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker.errors import StoreUnavailable

_FIRST_BACKOFF, _MAX_BACKOFF, _CONNECT_TIMEOUT = 0.1, 2.0, 1.0


def retry_tries(retry_seconds: float) -> int:
    """How many tries of redis-py's exponential backoff (``_FIRST_BACKOFF`` doubling up to ``_MAX_BACKOFF``, plus
    the connect timeout of each try) span ``retry_seconds``."""
    tries, spent, step = 0, 0.0, _FIRST_BACKOFF
    while spent < retry_seconds:
        spent += min(step, _MAX_BACKOFF) + _CONNECT_TIMEOUT
        step *= 2
        tries += 1
    return tries


def connect(url: str, retry_seconds: float) -> redis.Redis:
    """A client that retries a Redis that does not answer, with exponential backoff, for about ``retry_seconds``
    in all; after that its calls raise (and :func:`answering` turns that into :class:`StoreUnavailable`)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=10.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=_MAX_BACKOFF, base=_FIRST_BACKOFF), retry_tries(retry_seconds)),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


@contextmanager
def answering() -> Iterator[None]:
    """Redis calls inside raise :class:`StoreUnavailable` when Redis does not answer (retries spent)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        raise StoreUnavailable(f"Redis did not answer: {e}") from e
