"""Reading the input: JSON Lines or CSV as a stream of good rows (:class:`Row`) and bad ones (:class:`BadRow`).

Each row is checked as a live message is (``validate_text``); a reason, never an exception, comes back for a bad
row, so one broken line does not stop a run. Only a CSV header that cannot be read or lacks a named column is
refused up front (``InvalidMessage``).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

from worker.errors import InvalidMessage
from worker.schemas import validate_text


@dataclass
class Row:
    """A good input row: what gets stored and enqueued."""

    line: int
    text: str
    input_id: str | None = None
    conversation: str | None = None
    ts: float | None = None


@dataclass
class BadRow:
    """A row that cannot be processed, and why. Goes to the errors file, never to the queue."""

    line: int
    reason: str
    input_id: str | None = None


@dataclass
class Fields:
    """Which input fields hold what."""

    text: str = "text"
    id: str | None = "id"
    conversation: str | None = None
    timestamp: str | None = None


class _Lines:
    """Decoded lines of a binary stream, numbered from 1, none longer than ``limit`` bytes.

    A longer line is skipped without being held in memory (a 1 GB file with no newline must not load whole) and
    its number is left in ``overlong`` for the reader to report. Undecodable bytes become lone surrogates, which
    ``validate_text`` refuses with a clear reason, instead of stopping the run.
    """

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream, self.limit = stream, limit
        self.n = 0
        self.overlong: list[int] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        while True:
            raw = self.stream.readline(self.limit + 1)
            if not raw:
                raise StopIteration
            self.n += 1
            if len(raw) > self.limit and not raw.endswith(b"\n"):
                while True:  # drain the rest of the line in bounded pieces
                    more = self.stream.readline(1 << 20)
                    if not more or more.endswith(b"\n"):
                        break
                self.overlong.append(self.n)
                continue
            if self.n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            return raw.decode("utf-8", "surrogateescape")

    def take_overlong(self) -> list[BadRow]:
        bad = [BadRow(n, f"line is longer than {self.limit} bytes") for n in self.overlong]
        self.overlong.clear()
        return bad


def _scalar_id(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidMessage(f"{what} must be a string or an integer, got {type(value).__name__}")
    return str(value)


def parse_timestamp(value: Any) -> float | None:
    """Epoch seconds (or milliseconds) or an ISO 8601 string, as epoch seconds; ``None`` if unreadable."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            try:
                dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                return None
            return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value) / 1000.0 if value > 1e11 else float(value)
    return None


def _row(line: int, get: Any, fields: Fields, max_chars: int) -> Row | BadRow:
    """A Row from one record (``get(name) -> value | None``), or the first reason it is bad."""
    input_id: str | None = None
    try:
        input_id = _scalar_id(get(fields.id), f"id field {fields.id!r}") if fields.id else None
        raw_text = get(fields.text)
        if raw_text is None:
            raise InvalidMessage(f"no text (field {fields.text!r})")
        text = validate_text(raw_text, max_chars)
        conversation = None
        if fields.conversation:
            conversation = _scalar_id(get(fields.conversation), f"conversation field {fields.conversation!r}")
            if conversation is None:
                raise InvalidMessage(f"no conversation (field {fields.conversation!r})")
        if input_id is not None and not _encodable(input_id):
            raise InvalidMessage("id is not valid UTF-8")
        if conversation is not None and not _encodable(conversation):
            raise InvalidMessage("conversation is not valid UTF-8")
    except InvalidMessage as e:
        return BadRow(line, str(e), input_id if input_id is None or _encodable(input_id) else None)
    ts = parse_timestamp(get(fields.timestamp)) if fields.timestamp else None
    return Row(line, text, input_id, conversation, ts)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def line_limit(max_chars: int) -> int:
    """Longest input line accepted, in bytes: the longest text in UTF-8 plus room for the other fields."""
    return max_chars * 4 + 64 * 1024


def read_jsonl(stream: IO[bytes], fields: Fields, max_chars: int) -> Iterator[Row | BadRow]:
    """Rows of a JSON Lines stream, one object per line; blank lines are skipped."""
    lines = _Lines(stream, line_limit(max_chars))
    for text in lines:
        yield from lines.take_overlong()
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield BadRow(lines.n, f"broken JSON at column {e.colno}: {e.msg}")
            continue
        if not isinstance(obj, dict):
            yield BadRow(lines.n, f"a line must be a JSON object, got {type(obj).__name__}")
            continue
        yield _row(lines.n, lambda k, o=obj: o.get(k) if k else None, fields, max_chars)
    yield from lines.take_overlong()


def read_csv(stream: IO[bytes], fields: Fields, max_chars: int) -> Iterator[Row | BadRow]:
    """Rows of a CSV stream with a header line; a quoted field may span lines (a row's number is its first)."""
    limit = line_limit(max_chars)
    csv.field_size_limit(max(limit, 131072))
    lines = _Lines(stream, limit)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise InvalidMessage(f"the CSV header cannot be read: {e}") from None
    header = [h.strip() for h in header]
    for name, what in ((fields.text, "--text-field"), (fields.conversation, "--conversation-field")):
        if name and name not in header:
            raise InvalidMessage(f"no column {name!r} ({what}) in the CSV header: {header}")
    index = {name: i for i, name in enumerate(header)}
    if fields.id and fields.id not in index:
        fields = Fields(fields.text, None, fields.conversation, fields.timestamp)  # no id column: line numbers
    end = lines.n
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            yield from lines.take_overlong()
            yield BadRow(end + 1, f"broken CSV: {e}")
            end = lines.n
            continue
        start, end = end + 1, lines.n
        yield from lines.take_overlong()
        if not record:
            continue
        if len(record) != len(header):
            yield BadRow(start, f"expected {len(header)} fields (as the header), got {len(record)}")
            continue
        yield _row(start, lambda k, r=record: r[index[k]] if k in index else None, fields, max_chars)
    yield from lines.take_overlong()


def sniff_format(path: str, head: bytes) -> str:
    """``jsonl`` or ``csv``: from the file name, else from the first line (a JSON object starts with ``{``)."""
    name = path.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    return "jsonl" if head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"{") else "csv"


def open_input(path: str) -> IO[bytes]:
    """The input as a buffered binary stream: a file, a ``.gz`` file, or standard input for ``-``."""
    if path == "-":
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=1 << 20)


def count_lines(path: str) -> int | None:
    """Lines in a plain file (for the progress bars' totals), read in 1 MB pieces; None for stdin or .gz."""
    if path == "-" or path.endswith(".gz"):
        return None
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n
