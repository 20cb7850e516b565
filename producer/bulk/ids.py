"""The names a bulk job gives things: its job name, and each row's message and conversation ids.

Every id is derived from the input, never random, so the same command run again finds the turns of the run
before it and resumes instead of starting over (``docs/bulk.md``, "Ids, resuming, and conversations").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from worker.errors import InvalidMessage

from .readers import Fields, Row

_CLEAN_ID = re.compile(r"^[A-Za-z0-9_.:@/+=-]{1,100}$")
_JOB_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_job_name(job: str) -> str:
    """``job`` if it is a valid ``--job`` name, else ``InvalidMessage``."""
    if not _JOB_RE.match(job):
        raise InvalidMessage(f"--job must be 1 to 64 of A-Z a-z 0-9 _ . - (got {job!r})")
    return job


def default_job(path: str, fmt: str, fields: Fields, sentiment_only: bool) -> str:
    """A job name that is the same for the same command: the input's name and a hash of what defines the job."""
    where = "stdin" if path == "-" else os.path.abspath(path)
    stem = "stdin" if path == "-" else Path(path).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:40] or "input"
    spec = [where, fmt, fields.text, fields.id, fields.conversation, sentiment_only]
    return f"{stem}-{hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:8]}"


def _key(value: str) -> str:
    # Readable when the id is short and plain; hashed otherwise (ids with spaces, very long ids). The "i:"/"h:"
    # tags keep a plain id that happens to look like a hash apart from a real hash.
    if _CLEAN_ID.match(value):
        return f"i:{value}"
    return "h:" + hashlib.sha1(value.encode("utf-8")).hexdigest()


def message_id(job: str, row: Row) -> str:
    """``bulk:{job}:i:{row id}`` (or its hash), or ``bulk:{job}:L:{line}`` for a row without an id."""
    return f"bulk:{job}:{_key(row.input_id) if row.input_id is not None else f'L:{row.line}'}"


def conversation_id(job: str, row: Row) -> str:
    """The row's conversation: its own (one per row) unless a conversation field groups rows into one."""
    if row.conversation is None:
        return message_id(job, row)
    return f"bulk:{job}:c:{_key(row.conversation)}"
