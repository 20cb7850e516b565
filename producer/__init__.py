"""The producer side: a library for web backends (``Producer``; ``AsyncProducer`` for asyncio), a CLI
(``python -m producer``) and an example web app (``python -m producer.web``). No torch here.

What lives where:

- ``client``: ``Producer``, blocking: submit, turn, conversation, events, wait.
- ``aio``: ``AsyncProducer``, the same methods for asyncio code (redis.asyncio; the Celery publish on threads).
- ``core``: what both share, with no I/O: input checks, when to enqueue, how a follower of a turn's events goes on.
- ``__main__``: the CLI (send [--follow], follow, wait, show, dead-letters, bulk).
- ``bulk``: the ``bulk`` command (back-processing a feedback log).
- ``web``: the FastAPI app (the ``web`` extra): submit over HTTP, a turn's events as Server-Sent Events, a chat page.
"""

from producer.aio import AsyncProducer
from producer.client import Producer

__all__ = ["AsyncProducer", "Producer"]
