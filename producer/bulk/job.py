"""One run of a bulk job: the enqueue side and the collect side, and how they share the work.

``BulkJob.enqueue`` reads the rows a chunk at a time: it stores each chunk's turns in one pipeline, publishes their
tasks, marks them enqueued, and appends the good rows to the spool and the bad ones to the errors file.
``BulkJob.collect`` reads the spool behind it, polls the unfinished rows of a bounded window, and writes results
in input order. ``BulkJob.run`` does both at once (enqueue in a thread); ``--no-wait`` runs ``enqueue`` alone.
A run reports to a :class:`Progress` (the command line's is a pair of tqdm bars) and counts in a ``Tally``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from worker.errors import MessageIdConflict

from .ids import conversation_id, message_id
from .readers import BadRow, Fields, Row
from .report import Tally
from .results import ErrorsWriter, ResultsWriter, result_record
from .sender import Payload, Sender, make_batches
from .spool import SpoolEntry, SpoolReader, SpoolWriter

if TYPE_CHECKING:
    from worker.store import ResultsStore

# Rows are read, stored and enqueued this many at a time: one pipeline for the turns, one publish batch.
CHUNK_ROWS = 1000
# The collector keeps at most this many unfinished rows in memory (the rest wait in the spool on disk).
WINDOW_ROWS = 2000
# Finished rows are written, their turns read from the store, this many at a time.
WRITE_ROWS = 500
# Statuses read in one pipelined round trip.
POLL_ROWS = 1000


@dataclass(frozen=True)
class JobConfig:
    """What one run of a job does and where it writes."""

    job: str  # the job name: the namespace of its message and conversation ids
    fields: Fields
    sentiment_only: bool
    batch_size: int  # rows per classify_batch task
    queue: str  # the bulk queue, recorded on each turn
    errors_file: Path
    spool_path: Path
    chunk_rows: int = CHUNK_ROWS


class Progress(Protocol):
    """What a run tells whoever shows its progress. Called from the enqueue thread and the collector."""

    def enqueued(self, rows: int, bad: int) -> None:
        """A chunk of ``rows`` input rows (``bad`` of them bad) was stored and enqueued."""

    def enqueue_ended(self, rows: int) -> None:
        """Enqueuing ended (every row read, or stopped, or failed) after ``rows`` input rows."""

    def total_known(self, good: int) -> None:
        """Every row is read: ``good`` results are to be written. Repeated while the collector waits."""

    def finished(self, n: int) -> None:
        """``n`` more rows finished (done or failed)."""


class NoProgress:
    """Shows nothing."""

    def enqueued(self, rows: int, bad: int) -> None:
        pass

    def enqueue_ended(self, rows: int) -> None:
        pass

    def total_known(self, good: int) -> None:
        pass

    def finished(self, n: int) -> None:
        pass


@dataclass
class BulkJob:
    """One run of a bulk job: ``enqueue`` and ``collect``, handing rows over through the spool file.

    Neither side keeps more than a chunk or a window of rows in memory, whatever the input's size. ``stop`` asks
    the enqueue side to stop between rows (Ctrl-C); an exception on the enqueue side is kept in ``failure`` and
    raised again by the collector, in the main thread.
    """

    config: JobConfig
    store: ResultsStore
    sender: Sender
    progress: Progress = field(default_factory=NoProgress)
    tally: Tally = field(default_factory=Tally)
    enqueue_done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    failure: BaseException | None = None

    def run(self, rows: Iterable[Row | BadRow], writer: ResultsWriter, timeout: float | None) -> bool:
        """Enqueue in a thread while collecting in this one; what ``collect`` returns."""
        t = threading.Thread(target=_quiet(self.enqueue), args=(rows,), name="bulk-enqueue", daemon=True)
        t.start()
        finished_in_time = self.collect(writer, timeout)
        t.join()
        return finished_in_time

    # ---------------------------------------------------------------------------------------------- enqueue
    def enqueue(self, rows: Iterable[Row | BadRow]) -> None:
        """Store and enqueue every good row, in chunks; bad rows go to the errors file. Safe to run again."""
        t0 = time.perf_counter()
        try:
            with ErrorsWriter(self.config.errors_file) as errors, SpoolWriter(self.config.spool_path) as spool:
                chunk: list[Row | BadRow] = []
                for row in rows:
                    chunk.append(row)
                    if len(chunk) >= self.config.chunk_rows:
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
            self.progress.enqueue_ended(self.tally.rows)
            self.enqueue_done.set()

    def _enqueue_chunk(self, chunk: list[Row | BadRow], errors: ErrorsWriter, spool: SpoolWriter) -> None:
        cfg = self.config
        good = [r for r in chunk if isinstance(r, Row)]
        bad = [r for r in chunk if isinstance(r, BadRow)]
        ids = [(conversation_id(cfg.job, r), message_id(cfg.job, r)) for r in good]
        created = self.store.create_turns(
            [(c, m, r.text) for (c, m), r in zip(ids, good, strict=True)], queue=cfg.queue
        )
        todo: list[tuple[Payload, str]] = []
        entries: list[SpoolEntry] = []
        for row, (conv, mid), res in zip(good, ids, created, strict=True):
            if isinstance(res, MessageIdConflict):
                bad.append(BadRow(row.line, f"{res} (another row with the same id, or another job named "
                                            f"{cfg.job!r}: give this one its own --job)", row.input_id))
                continue
            turn, _ = res
            if turn.status.terminal:
                self.tally.already_done += 1  # done by an earlier run of this job: not enqueued again
            else:
                # New, or stored by an earlier run but unfinished: (re-)enqueue. Tasks skip a turn that is
                # already past their step, so a task that was still queued from before does no harm.
                todo.append(({"message_id": mid, "conversation_id": conv}, row.text))
            if cfg.fields.timestamp and row.ts is None:
                self.tally.bad_timestamps += 1
            entries.append(SpoolEntry(row.line, row.input_id, mid, row.ts))
        if todo:
            # Sentiment is batched in both modes (with replies, the worker sends each reply after the batch).
            # Batches are formed by length, except for conversations with replies: their turns are best
            # labelled and answered in input order, since a reply waits for the turns before it.
            by_length = cfg.sentiment_only or not cfg.fields.conversation
            self.sender.send_batches(make_batches(todo, cfg.batch_size, by_length), reply=not cfg.sentiment_only)
            self.store.mark_enqueued_many([p["message_id"] for p, _ in todo])
        errors.write(sorted(bad, key=lambda b: b.line))
        spool.write(entries)
        self.tally.rows += len(chunk)
        self.tally.bad += len(bad)
        self.tally.enqueued += len(todo)
        self.progress.enqueued(len(chunk), len(bad))

    # ---------------------------------------------------------------------------------------------- collect
    def collect(
        self, writer: ResultsWriter, timeout: float | None, poll: float = 0.25, max_poll: float = 1.0
    ) -> bool:
        """Write every row's result in input order as rows finish. False if ``timeout`` seconds passed with no
        row finishing (the rows still unfinished are written with their current status).

        Each poll reads the status of every unfinished row in the window. While nothing finishes the interval
        doubles from ``poll`` to ``max_poll``: polling the whole window at the shortest interval takes CPU from
        the worker when both share a machine, for no gain while the worker is in the middle of a batch."""
        window: deque[SpoolEntry] = deque()
        last_progress = time.monotonic()
        interval = poll
        with SpoolReader(self.config.spool_path) as spool:
            while True:
                if self.failure is not None:
                    raise self.failure
                ended = self.enqueue_done.is_set()  # read before the spool, so no row written after is missed
                window.extend(spool.read(WINDOW_ROWS - len(window)))
                if not window and ended and self.failure is None:
                    return True
                if ended:
                    self.progress.total_known(self.tally.good)
                progressed = self._poll(window)
                ready: list[SpoolEntry] = []
                while window and window[0].status is not None and len(ready) < WRITE_ROWS:
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

    def _poll(self, window: deque[SpoolEntry]) -> bool:
        """Mark the window's rows that finished since the last poll; whether any did."""
        waiting = [e for e in window if e.status is None]
        finished = 0
        for i in range(0, len(waiting), POLL_ROWS):
            part = waiting[i : i + POLL_ROWS]
            for e, s in zip(part, self.store.get_statuses([e.message_id for e in part]), strict=True):
                if s is None or s.terminal:
                    e.status = s.value if s else "missing"
                    finished += 1
        if finished:
            self.tally.finished += finished
            self.progress.finished(finished)
        return finished > 0

    def _write_rest(self, writer: ResultsWriter, window: deque[SpoolEntry], spool: SpoolReader) -> None:
        rest = [*window, *spool.rest()]
        for i in range(0, len(rest), WRITE_ROWS):
            self._write(writer, rest[i : i + WRITE_ROWS])

    def _write(self, writer: ResultsWriter, entries: list[SpoolEntry]) -> None:
        turns = self.store.get_turns([e.message_id for e in entries])
        for e, turn in zip(entries, turns, strict=True):
            rec = result_record(e, turn, self.config.sentiment_only)
            unfinished = turn is not None and not turn.status.terminal
            self.tally.add_result(rec["status"], rec["label"], rec["ts"], unfinished)
            writer.write(rec)


def _quiet(fn: Callable[..., object]) -> Callable[..., None]:
    # The enqueue thread's exception is re-raised by the collector in the main thread; don't print it twice.
    def run(*args: object) -> None:
        try:
            fn(*args)
        except BaseException:
            pass

    return run
