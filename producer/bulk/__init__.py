"""``python -m producer bulk``: back-process a feedback log (JSONL or CSV) through the bulk queue.

    python -m producer bulk feedback.jsonl --out results.jsonl --sentiment-only --plot summary.png

Streams the input (memory stays flat whatever its size), stores each good row as a turn and enqueues it on the
bulk queue in pipelined batches, then collects the results as they finish and writes them in input order.
Bad rows go, with their line number and reason, to ``RESULTS-stem.errors.jsonl`` beside the results. Message
ids are deterministic, so running the same command again after Ctrl-C, a crash or a worker restart skips the rows
already done and finishes the rest. What it does and its figures: ``docs/bulk.md``. No torch here.

What lives where:

- ``readers``: the input: JSONL and CSV readers yielding ``Row`` / ``BadRow``, format sniffing, line limits,
  timestamps, ``.gz`` and standard input.
- ``ids``: the job name (``--job`` or derived from the command) and each row's message and conversation ids.
- ``sender``: how a chunk's rows are grouped into ``classify_batch`` tasks, and ``CelerySender`` that
  publishes them through ``worker.contract``.
- ``spool``: the file that hands rows from the enqueue thread to the collector (``SpoolEntry``, one per row).
- ``job``: one run: ``BulkJob.enqueue`` (chunks: store, send, mark, spool) and ``BulkJob.collect`` (poll,
  write in order), its ``JobConfig`` and the ``Progress`` it reports to.
- ``results``: the results and errors files: their records and writers.
- ``report``: the run's counts (``Tally``), the summary table and the ``--plot`` PNG.
- ``cli``: the ``bulk`` subcommand: options, progress bars, and the order of a run (``cmd_bulk``).
"""

from __future__ import annotations

from .cli import TqdmProgress, add_parser, cmd_bulk
from .ids import check_job_name, conversation_id, default_job, message_id
from .job import CHUNK_ROWS, WINDOW_ROWS, BulkJob, JobConfig, NoProgress, Progress
from .readers import (
    BadRow,
    Fields,
    Row,
    count_lines,
    line_limit,
    open_input,
    parse_timestamp,
    read_csv,
    read_jsonl,
    sniff_format,
)
from .report import Tally, TimeBuckets, plot_summary, print_summary
from .results import RESULT_FIELDS, ErrorsWriter, ResultsWriter, errors_path, result_record, results_format_ok
from .sender import CelerySender, Payload, Sender, make_batches
from .spool import SpoolEntry, SpoolReader, SpoolWriter, spool_path

__all__ = [
    "CHUNK_ROWS",
    "RESULT_FIELDS",
    "WINDOW_ROWS",
    "BadRow",
    "BulkJob",
    "CelerySender",
    "ErrorsWriter",
    "Fields",
    "JobConfig",
    "NoProgress",
    "Payload",
    "Progress",
    "ResultsWriter",
    "Row",
    "Sender",
    "SpoolEntry",
    "SpoolReader",
    "SpoolWriter",
    "Tally",
    "TimeBuckets",
    "TqdmProgress",
    "add_parser",
    "check_job_name",
    "cmd_bulk",
    "conversation_id",
    "count_lines",
    "default_job",
    "errors_path",
    "line_limit",
    "make_batches",
    "message_id",
    "open_input",
    "parse_timestamp",
    "plot_summary",
    "print_summary",
    "read_csv",
    "read_jsonl",
    "result_record",
    "results_format_ok",
    "sniff_format",
    "spool_path",
]
