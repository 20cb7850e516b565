"""Every Redis key of the results store, declared once: its name pattern, its Redis type and what it holds.

A key is one line on :class:`Keys`; the declaration is also its documentation: the README's "Redis key layout"
table is :func:`markdown_table` (``python -m worker.store`` prints it, ``tests/test_docs.py`` keeps the README
equal to it). Code never writes a key name out; it asks a :class:`Keys` built from the prefix::

    keys = Keys("allinone")
    keys.turn("m1")        # 'allinone:turn:m1'
    keys.pending()         # 'allinone:pending'
    keys.held("w1")        # 'allinone:held:w1'
    keys.worker.match      # 'allinone:worker:*' (a SCAN pattern)
    keys.worker.id_of(k)   # the worker name back from a key SCAN found

Celery's own keys (the queue lists, ``unacked``) are Celery's: they share the database but not the prefix.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import overload

from worker.events import EVENTS_CAP

# The dead-letter list is trimmed to this many entries: a stream of malformed messages cannot fill Redis.
DEADLETTER_CAP = 10_000


class Key:
    """One key (or one family of keys, one per id) of the layout, declared on :class:`Keys`.

    ``pattern`` follows the prefix and its colon; its ``{fields}`` are the ids the key is built from, in order.
    Read on a :class:`Keys` it is a :class:`BoundKey` (it knows the prefix); read on the class, this declaration.
    """

    def __init__(self, pattern: str, redis_type: str, content: str) -> None:
        self.pattern = pattern
        self.redis_type = redis_type
        self.content = content
        self.fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, keys: None, owner: type) -> Key: ...

    @overload
    def __get__(self, keys: Keys, owner: type) -> BoundKey: ...

    def __get__(self, keys: Keys | None, owner: type) -> Key | BoundKey:
        return self if keys is None else BoundKey(self, keys.prefix)

    def row(self) -> str:
        """This key as a row of the README table."""
        return f"| `{{p}}:{self.pattern}` | {self.redis_type} | {self.content} |"


@dataclass(frozen=True)
class BoundKey:
    """A :class:`Key` under one prefix: call it with the key's ids to get the key's name."""

    key: Key
    prefix: str

    def __call__(self, *ids: str) -> str:
        if len(ids) != len(self.key.fields):
            raise TypeError(f"key {self.key.name!r} takes {self.key.fields}, got {len(ids)} id(s)")
        return f"{self.prefix}:" + self.key.pattern.format(**dict(zip(self.key.fields, ids, strict=True)))

    @property
    def match(self) -> str:
        """A SCAN pattern matching every key of this family."""
        return self(*["*"] * len(self.key.fields))

    def id_of(self, name: str) -> str:
        """The id a key of this family was built from (families with one id, at the end of the pattern)."""
        head = self(*[""] * len(self.key.fields))
        if len(self.key.fields) != 1 or not self.key.pattern.endswith("}") or not name.startswith(head):
            raise ValueError(f"{name!r} is not a key of the {self.key.name!r} family under {self.prefix!r}")
        return name[len(head):]


class Keys:
    """The key names of one results store, from its prefix (``ALLINONE_KEY_PREFIX``).

    To add a key, add one line here: its pattern, its Redis type, and what it holds, as the README shows it.
    """

    conv = Key("conv:{conversation_id}", "list", "message ids in submission order; a turn's index is its `seq`")
    turn = Key("turn:{message_id}", "hash", "one turn: the fields shown above (`sentiment` and `context` as JSON)")
    events = Key(
        "events:{message_id}",
        "stream",
        "the turn's events (`queued`, `classified`, `token`, `restart`, `done`, `failed`; fields `type` and `data` "
        f"as JSON; see `worker/events.py`), trimmed to about {EVENTS_CAP:,}, expiring with the turn",
    )
    deadletter = Key(
        "deadletter",
        "list",
        'JSON `{"payload", "reason", "at"}` of task messages that could not be processed, newest first, capped at '
        f"{DEADLETTER_CAP:,}",
    )
    worker = Key(
        "worker:{name}",
        "hash",
        "heartbeat of a worker whose model is loaded (values as JSON); expires `ALLINONE_HEARTBEAT_TTL_SECONDS` "
        "after its last beat (`worker/runtime.py` beats), and then the worker counts as dead",
    )
    pending = Key(
        "pending",
        "sorted set",
        "unfinished turns submitted one by one, scored by the last time a task touched them (the stale sweep reads it)",
    )
    lock = Key(
        "lock:{name}",
        "string",
        "a lock that expires by itself: one worker at a time runs a chore (the stale sweep, the put-back of messages "
        "no worker holds)",
    )
    held = Key(
        "held:{name}",
        "hash",
        "task messages a worker holds (running, or waiting for their countdown): Celery task id ↦ JSON of what to "
        "put back if the worker dies; written when it receives the message, dropped when the task ends; a live "
        "worker claims a dead one's as `claimed:<task id>` until they are back on their queue",
    )
    holders = Key(
        "holders",
        "set",
        "names of the workers that may have a `held` hash: the reclaim scan reads it instead of scanning keys",
    )

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @property
    def everything(self) -> str:
        """A SCAN pattern matching every key of this store (and of no other prefix)."""
        return f"{self.prefix}:*"

    @classmethod
    def layout(cls) -> list[Key]:
        """Every key, in declaration order."""
        return [k for k in vars(cls).values() if isinstance(k, Key)]


def markdown_table() -> str:
    """Every key as a Markdown table row (the README's "Redis key layout" table is this output)."""
    return "\n".join(["| key | type | content |", "|---|---|---|", *(k.row() for k in Keys.layout())])
