"""``python -m producer bulk``: the options, the checks on them, the progress bars (tqdm), and the order of a
run: enqueue (and collect, unless ``--no-wait``), then the summary, the plot and the one-line JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.errors import InvalidMessage
from worker.settings import Settings, get_settings

from .ids import check_job_name, default_job
from .job import CHUNK_ROWS, BulkJob, JobConfig
from .readers import Fields, count_lines, open_input, read_csv, read_jsonl, sniff_format
from .report import plot_summary, print_summary
from .results import ResultsWriter, errors_path, results_format_ok
from .sender import CelerySender, Sender
from .spool import spool_path

if TYPE_CHECKING:
    from worker.store import ResultsStore


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


def cmd_bulk(a: argparse.Namespace, store: ResultsStore | None = None, sender: Sender | None = None,
             settings: Settings | None = None) -> int:
    """Run a bulk job from parsed arguments; the exit code. ``store``/``sender``/``settings``: for tests."""
    s = settings or get_settings()
    out: Path = a.out
    if not results_format_ok(out):
        raise InvalidMessage(f"--out must end in .jsonl or .csv (got {out.name!r})")
    if a.batch_size < 1:
        raise InvalidMessage("--batch-size must be at least 1")
    if a.job is not None:
        check_job_name(a.job)
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
    spool = spool_path(out)
    spool.write_bytes(b"")
    config = JobConfig(job=job, fields=fields, sentiment_only=a.sentiment_only, batch_size=a.batch_size,
                       queue=s.bulk_queue, errors_file=errors, spool_path=spool, chunk_rows=max(1, a.chunk_rows))
    store = store if store is not None else _store(s)
    sender = sender if sender is not None else CelerySender(s)
    reader = read_jsonl if fmt == "jsonl" else read_csv
    rows = reader(stream, fields, s.max_message_chars)
    total = count_lines(a.input)
    if total is not None and fmt == "csv":
        total = max(0, total - 1)
    progress = TqdmProgress(total, collect=not a.no_wait)
    bulk = BulkJob(config, store, sender, progress)
    code = 0
    try:
        if a.no_wait:
            bulk.enqueue(rows)
        else:
            tmp = out.with_name(out.name + ".partial")
            writer = ResultsWriter(tmp, as_csv=out.suffix.lower() == ".csv")
            try:
                finished_in_time = bulk.run(rows, writer, a.timeout or None)
            finally:
                writer.close()
            os.replace(tmp, out)
            if not finished_in_time:
                code = 3
    except KeyboardInterrupt:
        bulk.stop.set()
        code = 130
    finally:
        progress.close()
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


class TqdmProgress:
    """Two bars on standard error: rows enqueued and, when the run collects, rows completed."""

    def __init__(self, total: int | None, collect: bool) -> None:
        from tqdm import tqdm

        kw: dict[str, Any] = {"file": sys.stderr, "dynamic_ncols": True, "mininterval": 0.5, "unit": "row",
                              "smoothing": 0.1}
        self.enqueued_bar = tqdm(total=total, desc="enqueued ", position=0, **kw)
        self.completed_bar = tqdm(total=total, desc="completed", position=1, **kw) if collect else None

    def enqueued(self, rows: int, bad: int) -> None:
        self.enqueued_bar.update(rows)

    def enqueue_ended(self, rows: int) -> None:
        # Closed now, so that its rate and time are the enqueue phase's, not the whole run's.
        _set_total(self.enqueued_bar, rows)
        self.enqueued_bar.close()

    def total_known(self, good: int) -> None:
        if self.completed_bar is not None:
            _set_total(self.completed_bar, good)

    def finished(self, n: int) -> None:
        if self.completed_bar is not None:
            self.completed_bar.update(n)

    def close(self) -> None:
        self.enqueued_bar.close()
        if self.completed_bar is not None:
            self.completed_bar.close()


def _set_total(bar: Any, n: int) -> None:
    if bar.total != n:
        bar.total = n
        bar.refresh()


def _store(s: Settings) -> ResultsStore:
    from worker.store import store_from_settings

    return store_from_settings(s)
