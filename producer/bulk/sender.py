"""Putting rows on the bulk queue: how a chunk's rows are grouped into ``classify_batch`` tasks, and the sender
that publishes them (Celery; tests pass a fake with the same ``send_batches``).

Task names and the message format belong to ``worker.contract``; this module only decides the batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from worker.errors import StoreUnavailable
from worker.settings import Settings

Payload = dict[str, str]  # {"message_id", "conversation_id"}: what a classify_batch task carries per row


class Sender(Protocol):
    """Puts tasks on the bulk queue."""

    def send_batches(self, batches: list[list[Payload]], reply: bool = False) -> None:
        """One ``allinone.classify_batch`` per list of payloads; with ``reply`` the worker then sends each
        message's ``allinone.reply``."""
        ...


def make_batches(rows: Sequence[tuple[Payload, str]], batch_size: int, by_length: bool) -> list[list[Payload]]:
    """The payloads of ``(payload, text)`` rows cut into tasks of ``batch_size``; with ``by_length``, shortest
    text first.

    Sorting puts texts of similar length in one batch, so the worker's forward passes waste little on padding
    (results are still written in input order). Length is counted in UTF-8 bytes, not characters, because bytes
    follow the token count across scripts (a CJK character takes three bytes and far more of a token than a Latin
    letter, which takes one): sorted by characters, mixed Chinese and English batches held far more padding
    (docs/bulk.md, "Figures"). Callers keep input order for a conversation's turns, which are answered in turn.
    """
    order = sorted(rows, key=lambda r: len(r[1].encode("utf-8"))) if by_length else list(rows)
    payloads = [p for p, _ in order]
    return [payloads[i : i + batch_size] for i in range(0, len(payloads), batch_size)]


class CelerySender:
    """Publishes with Celery through ``worker.contract``, all of one call's messages in one Redis pipeline."""

    def __init__(self, settings: Settings) -> None:
        from producer.client import make_celery

        self.queue = settings.bulk_queue
        self.app = make_celery(settings)
        # kombu only batches publishes into one pipeline when redis-py will not retry the pipeline on its own;
        # a failed batch is retried by us (re-running the command: every step is idempotent).
        self.app.conf.broker_transport_options = {
            **self.app.conf.broker_transport_options,
            "retry_on_timeout": False,
        }

    def send_batches(self, batches: list[list[Payload]], reply: bool = False) -> None:
        from kombu.exceptions import OperationalError

        from worker.contract import send_batches

        try:
            # max_batch counts Redis commands, one or two a message: room for the whole call in one pipeline
            send_batches(self.app, batches, self.queue, reply=reply, max_batch=2 * max(1, len(batches)))
        except (OperationalError, OSError) as e:
            raise StoreUnavailable(f"the broker did not take the bulk tasks (run the command again): {e}") from e
