"""``python -m producer bulk``: back-process a feedback log (JSONL or CSV) through the bulk queue.

    python -m producer bulk feedback.jsonl --out results.jsonl --sentiment-only --plot summary.png

Streams the input (memory stays flat whatever its size), stores each good row as a turn and enqueues it on the
bulk queue in pipelined batches, then collects the results as they finish and writes them in input order.
Bad rows go, with their line number and reason, to ``RESULTS-stem.errors.jsonl`` beside the results.

Message ids are deterministic (``bulk:{job}:{row id or line number}``), so running the same command again after
Ctrl-C, a crash or a worker restart skips the rows already done and finishes the rest. How rows map to
conversations, queues and figures: ``docs/bulk.md``. No torch here.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import gzip
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol

from worker.errors import InvalidMessage, MessageIdConflict, StoreUnavailable
from worker.schemas import Status, Turn, validate_text
from worker.settings import Settings, get_settings

# Rows are read, stored and enqueued this many at a time: one pipeline for the turns, one publish batch.
CHUNK_ROWS = 1000
# The collector keeps at most this many unfinished rows in memory (the rest wait in the spool file on disk).
WINDOW_ROWS = 2000
_CLEAN_ID = re.compile(r"^[A-Za-z0-9_.:@/+=-]{1,100}$")
_JOB_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# ---------------------------------------------------------------------------------------------------- rows


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

    def record(self) -> dict[str, Any]:
        return {"line": self.line, "id": self.input_id, "reason": self.reason}


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


# ------------------------------------------------------------------------------------------------- ids


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


# ------------------------------------------------------------------------------------------- store, broker


class BulkStore(Protocol):
    """The pipelined calls of ``worker.store.RedisStore`` and ``MemoryStore`` that a bulk job uses."""

    def create_turns(
        self, items: list[tuple[str, str, str]], queue: str | None = None
    ) -> list[tuple[Turn, bool] | MessageIdConflict]: ...

    def mark_enqueued_many(self, message_ids: list[str]) -> None: ...

    def get_statuses(self, message_ids: list[str]) -> list[Status | None]: ...

    def get_turns(self, message_ids: list[str]) -> list[Turn | None]: ...


class Sender(Protocol):
    """Puts tasks on the bulk queue."""

    def send_batches(self, batches: list[list[dict[str, str]]], reply: bool = False) -> None:
        """One ``allinone.classify_batch`` per list of payloads; with ``reply`` the worker then sends each
        message's ``allinone.reply``."""
        ...


class CelerySender:
    """Publishes with Celery, all of one call's messages in one Redis pipeline (kombu's publish batch)."""

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

    def send_batches(self, batches: list[list[dict[str, str]]], reply: bool = False) -> None:
        from kombu.exceptions import OperationalError

        from worker.contract import send_batches

        try:
            send_batches(self.app, batches, self.queue, reply=reply, max_batch=2 * CHUNK_ROWS)
        except (OperationalError, OSError) as e:
            raise StoreUnavailable(f"the broker did not take the bulk tasks (run the command again): {e}") from e


# ------------------------------------------------------------------------------------------------- output


RESULT_FIELDS = ["line", "id", "text", "label", "confidence", "reply", "status", "error", "message_id",
                 "conversation_id", "ts"]


class ResultsWriter:
    """Results in input order, as JSON Lines or CSV (by the file's extension)."""

    def __init__(self, path: Path, as_csv: bool) -> None:
        self.csv = as_csv
        self.f = path.open("w", encoding="utf-8", newline="")
        self.w = csv.DictWriter(self.f, RESULT_FIELDS, extrasaction="ignore") if self.csv else None
        if self.w:
            self.w.writeheader()

    def write(self, rec: dict[str, Any]) -> None:
        if self.w:
            self.w.writerow({k: "" if v is None else v for k, v in rec.items()})
        else:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.f.close()


def results_format_ok(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv")


def errors_path(out: Path) -> Path:
    """Where bad rows go: beside RESULTS, its stem + ``.errors.jsonl``."""
    return out.with_name(out.stem + ".errors.jsonl")


class TimeBuckets:
    """Label counts per time bucket, for the plot. Starts at minutes; coarsens when buckets get many, so memory
    stays bounded however long the log spans."""

    def __init__(self, max_buckets: int = 20_000) -> None:
        self.width, self.max = 60.0, max_buckets
        self.counts: dict[float, Counter[str]] = {}

    def add(self, ts: float, label: str) -> None:
        b = ts - ts % self.width
        self.counts.setdefault(b, Counter())[label] += 1
        while len(self.counts) > self.max:
            self.width *= 60 if self.width < 3600 else 24
            merged: dict[float, Counter[str]] = {}
            for k, c in self.counts.items():
                merged.setdefault(k - k % self.width, Counter()).update(c)
            self.counts = merged


@dataclass
class Tally:
    """What the summary reports."""

    rows: int = 0
    bad: int = 0
    enqueued: int = 0
    already_done: int = 0
    finished: int = 0
    written: int = 0
    pending: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    bad_timestamps: int = 0
    enqueue_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    buckets: TimeBuckets = field(default_factory=TimeBuckets)

    @property
    def good(self) -> int:
        return self.rows - self.bad

    def as_dict(self) -> dict[str, Any]:
        elapsed = (self.finished_at or time.monotonic()) - self.started
        pos, neg = self.labels["positive"], self.labels["negative"]
        return {
            "rows": self.rows,
            "good": self.good,
            "bad": self.bad,
            "enqueued": self.enqueued,
            "already_done": self.already_done,
            "written": self.written,
            "done": self.statuses["done"],
            "failed": self.statuses["failed"] + self.statuses["missing"],
            "pending": self.pending,
            "positive": pos,
            "negative": neg,
            "positive_share": round(pos / (pos + neg), 4) if pos + neg else None,
            "enqueue_rate": round(self.good / self.enqueue_seconds, 1) if self.enqueue_seconds else None,
            # rows finished by the worker during this run (not those done by an earlier one), per second
            "throughput": round(max(0, self.finished - self.already_done) / elapsed, 2) if elapsed > 0 else None,
            "elapsed_seconds": round(elapsed, 2),
        }


# ---------------------------------------------------------------------------------------------------- job


@dataclass
class BulkJob:
    """One run of a bulk job: enqueue (``enqueue``) and collect (``collect``), sharing a spool file.

    The spool holds one small line per good row (line, id, message id, timestamp) in input order, written as
    rows are enqueued and read back by the collector: neither side keeps more than a window of rows in memory.
    """

    store: BulkStore
    sender: Sender
    job: str
    fields: Fields
    sentiment_only: bool
    batch_size: int
    bulk_queue: str
    max_chars: int
    errors_file: Path
    spool_path: Path
    chunk_rows: int = CHUNK_ROWS
    tally: Tally = field(default_factory=Tally)
    enqueue_done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None
    on_enqueued: Any = None
    on_finished: Any = None
    on_total: Any = None
    on_enqueue_end: Any = None

    # ---------------------------------------------------------------------------------------------- enqueue
    def enqueue(self, rows: Iterable[Row | BadRow]) -> None:
        """Store and enqueue every good row, in chunks; bad rows go to the errors file. Safe to run again."""
        t0 = time.perf_counter()
        try:
            with self.errors_file.open("w", encoding="utf-8") as errors, self.spool_path.open(
                "a", encoding="utf-8"
            ) as spool:
                chunk: list[Row | BadRow] = []
                for row in rows:
                    chunk.append(row)
                    if len(chunk) >= self.chunk_rows:
                        self._enqueue_chunk(chunk, errors, spool)
                        chunk = []
                    if self.stop.is_set():
                        return
                if chunk:
                    self._enqueue_chunk(chunk, errors, spool)
        except BaseException as e:  # handed to the collector, which re-raises it in the main thread
            self.failure = e
            raise
        finally:
            self.tally.enqueue_seconds = time.perf_counter() - t0  # reading and parsing included
            if self.on_enqueue_end:
                self.on_enqueue_end()
            self.enqueue_done.set()

    def _enqueue_chunk(self, chunk: list[Row | BadRow], errors: IO[str], spool: IO[str]) -> None:
        good = [r for r in chunk if isinstance(r, Row)]
        bad = [r for r in chunk if isinstance(r, BadRow)]
        ids = [(conversation_id(self.job, r), message_id(self.job, r)) for r in good]
        created = self.store.create_turns(
            [(c, m, r.text) for (c, m), r in zip(ids, good, strict=True)], queue=self.bulk_queue
        )
        todo: list[dict[str, str]] = []
        entries: list[str] = []
        for row, (conv, mid), res in zip(good, ids, created, strict=True):
            if isinstance(res, MessageIdConflict):
                bad.append(BadRow(row.line, f"{res} (another row with the same id, or another job named "
                                            f"{self.job!r}: give this one its own --job)", row.input_id))
                continue
            turn, _ = res
            if turn.status.terminal:
                self.tally.already_done += 1  # done by an earlier run of this job: not enqueued again
            else:
                # New, or stored by an earlier run but unfinished: (re-)enqueue. Tasks skip a turn that is
                # already past their step, so a task that was still queued from before does no harm.
                todo.append({"message_id": mid, "conversation_id": conv})
            if self.fields.timestamp and row.ts is None:
                self.tally.bad_timestamps += 1
            entries.append(json.dumps({"l": row.line, "i": row.input_id, "m": mid, "t": row.ts}) + "\n")
        if todo:
            # Sentiment is batched in both modes (with replies, the worker sends each reply after the batch).
            if self.sentiment_only or not self.fields.conversation:
                # Length bucketing across the chunk: each batch then holds texts of similar length, so the
                # worker's forward passes waste little on padding (results are still written in input order).
                # Not for conversations: their turns are best labelled and answered in input order (a reply
                # waits for the turns before it). Length in UTF-8 bytes, not characters: a CJK character is
                # about 0.7 tokens and 3 bytes, a Latin letter about 0.2 tokens and 1 byte, so bytes follow the
                # token count across scripts (correlation 0.97 on the zh+en dev sets, characters 0.66). Sorted
                # by characters, mixed zh/en batches were 48 % padding and the worker 1.7x slower.
                length = {m: len(r.text.encode("utf-8")) for (_, m), r in zip(ids, good, strict=True)}
                todo.sort(key=lambda p: length[p["message_id"]])
            self.sender.send_batches(
                [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)],
                reply=not self.sentiment_only,
            )
            self.store.mark_enqueued_many([p["message_id"] for p in todo])
        for b in sorted(bad, key=lambda b: b.line):
            errors.write(json.dumps(b.record(), ensure_ascii=False) + "\n")
        errors.flush()
        spool.writelines(entries)
        spool.flush()
        self.tally.rows += len(chunk)
        self.tally.bad += len(bad)
        self.tally.enqueued += len(todo)
        if self.on_enqueued:
            self.on_enqueued(len(chunk), len(bad))

    # ---------------------------------------------------------------------------------------------- collect
    def collect(
        self, writer: ResultsWriter, timeout: float | None, poll: float = 0.25, max_poll: float = 1.0
    ) -> bool:
        """Write every row's result in input order as rows finish. False if ``timeout`` seconds passed with no
        row finishing (the rows still unfinished are written with their current status).

        Each poll reads the status of every unfinished row in the window (up to 2,000 reads). While nothing
        finishes the interval doubles from ``poll`` to ``max_poll``: a worker finishes a bulk batch every second
        or two, and polling the whole window four times a second took CPU from the worker when both share a
        machine."""
        window: deque[dict[str, Any]] = deque()
        last_progress = time.monotonic()
        interval = poll
        with self.spool_path.open("r", encoding="utf-8") as spool:
            while True:
                if self.failure is not None:
                    raise self.failure
                ended = self.enqueue_done.is_set()  # read before the spool, so no row written after is missed
                while len(window) < WINDOW_ROWS:
                    pos = spool.tell()
                    line = spool.readline()
                    if not line.endswith("\n"):
                        spool.seek(pos)  # a line being written: read it whole next time
                        break
                    e = json.loads(line)
                    e["s"] = None
                    window.append(e)
                if not window and ended and self.failure is None:
                    return True
                if ended and self.on_total:
                    self.on_total(self.tally.rows - self.tally.bad)
                waiting = [e for e in window if e["s"] is None]
                progressed = False
                for i in range(0, len(waiting), 1000):
                    part = waiting[i : i + 1000]
                    for e, s in zip(part, self.store.get_statuses([e["m"] for e in part]), strict=True):
                        if s is None or s.terminal:
                            e["s"] = s.value if s else "missing"
                            self.tally.finished += 1
                            progressed = True
                            if self.on_finished:
                                self.on_finished(1)
                ready: list[dict[str, Any]] = []
                while window and window[0]["s"] is not None and len(ready) < 500:
                    ready.append(window.popleft())
                if ready:
                    self._write(writer, ready)
                now = time.monotonic()
                if progressed or ready:
                    # halve, not reset: the next batch is as far away as this one was
                    last_progress, interval = now, max(poll, interval / 2)
                elif ended and timeout is not None and now - last_progress > timeout:
                    self._write_rest(writer, window, spool)
                    return False
                if not ready and not progressed:
                    time.sleep(interval)
                    interval = min(max_poll, interval * 2)

    def _write_rest(self, writer: ResultsWriter, window: deque[dict[str, Any]], spool: IO[str]) -> None:
        rest = list(window)
        for line in spool:
            rest.append(json.loads(line))
        for i in range(0, len(rest), 500):
            part = rest[i : i + 500]
            for e in part:
                e["s"] = e.get("s") or "pending"
            self._write(writer, part)

    def _write(self, writer: ResultsWriter, entries: list[dict[str, Any]]) -> None:
        turns = self.store.get_turns([e["m"] for e in entries])
        for e, turn in zip(entries, turns, strict=True):
            rec: dict[str, Any] = {
                "line": e["l"], "id": e["i"], "text": None, "label": None, "confidence": None, "reply": None,
                "status": e["s"], "error": None, "message_id": e["m"], "conversation_id": None, "ts": e["t"],
            }
            if turn is None:
                rec["status"] = "missing"
                rec["error"] = "the turn is gone from the results store (expired or deleted): run the job again"
            else:
                rec.update(text=turn.text, conversation_id=turn.conversation_id, error=turn.error,
                           status=turn.status.value if e["s"] == "pending" else e["s"])
                if not turn.status.terminal:  # only after --timeout: written as it stands
                    rec["error"] = "not finished within --timeout: run the same command again to collect it"
                    self.tally.pending += 1
                if turn.sentiment is not None:
                    rec["label"] = turn.sentiment.label
                    rec["confidence"] = round(turn.sentiment.confidence, 4)
                    self.tally.labels[turn.sentiment.label] += 1
                    if e["t"] is not None:
                        self.tally.buckets.add(e["t"], turn.sentiment.label)
                # Sentiment-only turns end with an empty reply: none, in the results. A chat reply is kept as is.
                rec["reply"] = None if self.sentiment_only else turn.reply
            self.tally.statuses[rec["status"]] += 1
            writer.write(rec)
            self.tally.written += 1


# ------------------------------------------------------------------------------------------------ summary


def print_summary(tally: Tally, out: Path | None, errors: Path, console_file: IO[str] | None = None) -> None:
    """The end-of-run table (rich), to standard error."""
    from rich.console import Console
    from rich.table import Table

    d = tally.as_dict()
    console = Console(file=console_file or sys.stderr)
    t = Table(title="bulk job summary", show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_column("share", justify="right")
    labelled = d["positive"] + d["negative"]
    for name in ("positive", "negative"):
        share = f"{d[name] / labelled:.1%}" if labelled else "-"
        t.add_row(name, str(d[name]), share)
    t.add_section()
    t.add_row("rows read", str(d["rows"]), "")
    t.add_row("bad rows (errors file)", str(d["bad"]), f"{d['bad'] / d['rows']:.1%}" if d["rows"] else "-")
    t.add_row("done before this run", str(d["already_done"]), "")
    t.add_row("enqueued this run", str(d["enqueued"]), "")
    t.add_row("failed", str(d["failed"]), f"{d['failed'] / d['written']:.1%}" if d["written"] else "-")
    if d["pending"]:
        t.add_row("not finished (timeout)", str(d["pending"]), "")
    t.add_section()
    t.add_row("enqueue rate", f"{d['enqueue_rate'] or 0:,.0f} rows/s", "")
    t.add_row("throughput", f"{d['throughput'] or 0:,.2f} rows/s", "")
    t.add_row("elapsed", f"{d['elapsed_seconds']:,.1f} s", "")
    console.print(t)
    if out is not None:
        console.print(f"results: {out}")
    console.print(f"errors:  {errors}")


def plot_summary(tally: Tally, path: Path, title: str) -> None:
    """A PNG: sentiment share overall and, when rows had timestamps, the share over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    pos, neg = tally.labels["positive"], tally.labels["negative"]
    over_time = bool(tally.buckets.counts)
    fig, axes = plt.subplots(1, 2 if over_time else 1, figsize=(11 if over_time else 5, 3.8),
                             gridspec_kw={"width_ratios": [1, 3]} if over_time else None, squeeze=False)
    ax = axes[0][0]
    total = pos + neg
    shares = [pos / total, neg / total] if total else [0, 0]
    bars = ax.bar(["positive", "negative"], shares, color=["#3a923a", "#c03d3e"])
    for b, n, s in zip(bars, (pos, neg), shares, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, s + 0.01, f"{s:.0%}\n({n:,})", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("share of rows")
    ax.set_title(f"overall ({total:,} rows)")
    if over_time:
        ax2 = axes[0][1]
        keys = sorted(tally.buckets.counts)
        # Re-bucket to the smallest round width that gives at most ~60 bars, so a long log stays readable.
        span = keys[-1] - keys[0] + tally.buckets.width
        width = next((w for w in _NICE_WIDTHS if w >= tally.buckets.width and span / w <= 60), _NICE_WIDTHS[-1])
        width = max(width, tally.buckets.width)
        merged: dict[float, Counter[str]] = {}
        for k in keys:
            merged.setdefault(k - k % width, Counter()).update(tally.buckets.counts[k])
        xs = sorted(merged)
        when = [datetime.fromtimestamp(x, tz=timezone.utc) for x in xs]
        middle = [datetime.fromtimestamp(x + width / 2, tz=timezone.utc) for x in xs]
        p = [merged[x]["positive"] for x in xs]
        n = [merged[x]["negative"] for x in xs]
        share = [a / (a + b) if a + b else float("nan") for a, b in zip(p, n, strict=True)]
        rows = [a + b for a, b in zip(p, n, strict=True)]
        ax2.bar(when, rows, width=width / 86400 * 0.9, color="#cccccc", align="edge", label="rows")
        ax2.set_ylabel("rows per bucket")
        ax3 = ax2.twinx()
        ax3.plot(middle, share, "o-", color="#3a923a", label="positive share")
        ax3.set_ylim(0, 1)
        ax3.set_ylabel("positive share")
        ax2.xaxis.set_major_formatter(mdates.ConciseDateFormatter(mdates.AutoDateLocator()))
        ax2.set_title(f"over time (UTC, buckets of {_human(width)})")
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_NICE_WIDTHS = [60 * m for m in (1, 5, 15, 30)] + [3600 * h for h in (1, 2, 3, 6, 12)] + [
    86400 * d for d in (1, 2, 7, 14, 30, 91, 365)
]


def _human(seconds: float) -> str:
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= s:
            return f"{seconds / s:.3g} {unit}"
    return f"{seconds:g} s"


# ---------------------------------------------------------------------------------------------------- CLI


def add_parser(sub: Any) -> None:
    """Register ``bulk`` on the ``python -m producer`` subcommands."""
    b = sub.add_parser(
        "bulk",
        help="back-process a JSONL or CSV file through the bulk queue; results in input order",
        description="Back-process a feedback log (JSONL or CSV) through the bulk queue; results in input order. "
        "Run the same command again to resume. See docs/bulk.md.",
    )
    b.add_argument("input", metavar="INPUT", help="a .jsonl or .csv file (.gz too), or - for standard input")
    b.add_argument("--format", choices=["jsonl", "csv"], help="input format (default: from the name, else sniffed)")
    b.add_argument("--text-field", default="text", metavar="NAME",
                   help="field holding the message text (default: text)")
    b.add_argument("--id-field", default="id", metavar="NAME",
                   help="field holding the row id (default: id); rows without one are keyed by line number")
    b.add_argument("--conversation-field", metavar="NAME",
                   help="field grouping rows into conversations (turns in input order); default: one per row")
    b.add_argument("--timestamp-field", metavar="NAME",
                   help="field with the row's time (epoch or ISO 8601), for the plot")
    b.add_argument("--sentiment-only", action="store_true", help="labels only, no replies (batched, much faster)")
    b.add_argument("--job", metavar="NAME",
                   help="job name (default: the input's name + a hash of the input path and options); "
                        "same job = resume")
    b.add_argument("--out", required=True, type=Path, metavar="RESULTS", help="results file, .jsonl or .csv")
    b.add_argument("--plot", type=Path, metavar="SUMMARY.png",
                   help="write a PNG of the sentiment shares (over time with --timestamp-field)")
    b.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="rows per classify_batch task with --sentiment-only (default 32)")
    b.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="give up collecting when no row finished for this many seconds (default 600; 0: never)")
    b.add_argument("--no-wait", action="store_true", help="enqueue and exit; run again without it to collect")
    # Rows per store pipeline and publish batch; smaller only to see a slow stdin trickle enqueued sooner.
    b.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_bulk)


def cmd_bulk(a: argparse.Namespace, store: BulkStore | None = None, sender: Sender | None = None,
             settings: Settings | None = None) -> int:
    """Run a bulk job from parsed arguments; the exit code. ``store``/``sender``/``settings``: for tests."""
    s = settings or get_settings()
    out: Path = a.out
    if not results_format_ok(out):
        raise InvalidMessage(f"--out must end in .jsonl or .csv (got {out.name!r})")
    if a.batch_size < 1:
        raise InvalidMessage("--batch-size must be at least 1")
    if a.job is not None and not _JOB_RE.match(a.job):
        raise InvalidMessage(f"--job must be 1 to 64 of A-Z a-z 0-9 _ . - (got {a.job!r})")
    if a.input != "-" and not os.path.isfile(a.input):
        raise InvalidMessage(f"no input file {a.input!r}")
    stream = open_input(a.input)
    fmt = a.format
    if fmt is None:
        head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
        fmt = sniff_format(a.input, head.split(b"\n", 1)[0])
    fields = Fields(a.text_field, a.id_field or None, a.conversation_field, a.timestamp_field)
    job = a.job or default_job(a.input, fmt, fields, a.sentiment_only)
    if a.input == "-" and a.job is None:
        print(f"note: job name {job!r} from standard input; give --job NAME so that another input gets its own "
              "ids", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = errors_path(out)
    # Beside RESULTS (not in a tmpfs /tmp: it grows with the input), one per results file, so a crashed run's
    # spool is reused, not left behind.
    spool = out.with_name(f".{out.name}.spool")
    spool.write_bytes(b"")
    bulk = BulkJob(
        store=store if store is not None else _store(s),
        sender=sender if sender is not None else CelerySender(s),
        job=job, fields=fields, sentiment_only=a.sentiment_only, batch_size=a.batch_size,
        bulk_queue=s.bulk_queue, max_chars=s.max_message_chars, errors_file=errors, spool_path=spool,
        chunk_rows=max(1, a.chunk_rows),
    )
    reader = read_jsonl if fmt == "jsonl" else read_csv
    rows = reader(stream, fields, s.max_message_chars)

    from tqdm import tqdm

    total = count_lines(a.input)
    if total is not None and fmt == "csv":
        total = max(0, total - 1)
    kw: dict[str, Any] = {"file": sys.stderr, "dynamic_ncols": True, "mininterval": 0.5, "unit": "row",
                          "smoothing": 0.1}
    enq = tqdm(total=total, desc="enqueued ", position=0, **kw)
    bulk.on_enqueued = lambda n, _bad: enq.update(n)
    # Closed when enqueuing ends, so that its rate and time are the enqueue phase's, not the whole run's.
    bulk.on_enqueue_end = lambda: (_set_total(enq, bulk.tally.rows), enq.close())
    fin = None
    code = 0
    try:
        if a.no_wait:
            bulk.enqueue(rows)
        else:
            fin = tqdm(total=total, desc="completed", position=1, **kw)
            bulk.on_finished = fin.update
            bulk.on_total = lambda n: _set_total(fin, n)
            t = threading.Thread(target=_quiet(bulk.enqueue), args=(rows,), name="bulk-enqueue", daemon=True)
            t.start()
            tmp = out.with_name(out.name + ".partial")
            writer = ResultsWriter(tmp, as_csv=out.suffix.lower() == ".csv")
            finished_in_time = False
            try:
                finished_in_time = bulk.collect(writer, a.timeout or None)
            finally:
                writer.close()
            t.join()
            os.replace(tmp, out)
            if not finished_in_time:
                code = 3
    except KeyboardInterrupt:
        bulk.stop.set()
        code = 130
    finally:
        enq.close()
        if fin is not None:
            fin.close()
        stream.close()
        spool.unlink(missing_ok=True)
        bulk.tally.finished_at = time.monotonic()
    print_summary(bulk.tally, None if a.no_wait or code == 130 else out, errors)
    if code == 130:
        print(f"interrupted: run the same command again to resume job {job!r}", file=sys.stderr)
    elif a.no_wait:
        print(f"enqueued; run the same command without --no-wait to collect the results of job {job!r}",
              file=sys.stderr)
    elif code == 3:
        print(f"some rows did not finish within --timeout {a.timeout:g} s; run the same command again to collect "
              "them", file=sys.stderr)
    if a.plot is not None and code != 130 and not a.no_wait:
        plot_summary(bulk.tally, a.plot, f"job {job}")
    print(json.dumps({"job": job, "results": None if a.no_wait or code == 130 else str(out),
                      "errors": str(errors), **bulk.tally.as_dict()}))
    return code


def _set_total(bar: Any, n: int) -> None:
    if bar.total != n:
        bar.total = n
        bar.refresh()


def _quiet(fn: Any) -> Any:
    # The enqueue thread's exception is re-raised by the collector in the main thread; don't print it twice.
    def run(*args: Any) -> None:
        try:
            fn(*args)
        except BaseException:
            pass

    return run


def _store(s: Settings) -> BulkStore:
    from worker.store import store_from_settings

    return store_from_settings(s)
