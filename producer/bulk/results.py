"""What a run writes: the results file (one record per good row, in input order) and the errors file (one record
per bad row). Both formats are documented in ``docs/bulk.md`` and read by other programs: keep them stable.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from worker.schemas import Turn

from .readers import BadRow
from .spool import SpoolEntry

RESULT_FIELDS = ["line", "id", "text", "label", "confidence", "reply", "status", "error", "message_id",
                 "conversation_id", "ts"]

MISSING = "the turn is gone from the results store (expired or deleted): run the job again"
NOT_FINISHED = "not finished within --timeout: run the same command again to collect it"


def results_format_ok(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".csv")


def errors_path(out: Path) -> Path:
    """Where bad rows go: beside RESULTS, its stem + ``.errors.jsonl``."""
    return out.with_name(out.stem + ".errors.jsonl")


def result_record(entry: SpoolEntry, turn: Turn | None, sentiment_only: bool) -> dict[str, Any]:
    """A row's result from its turn. ``entry.status`` is the status the collector saw finish, or ``None`` for a
    row written as it stands (after ``--timeout``)."""
    rec: dict[str, Any] = {
        "line": entry.line, "id": entry.input_id, "text": None, "label": None, "confidence": None, "reply": None,
        "status": entry.status, "error": None, "message_id": entry.message_id, "conversation_id": None,
        "ts": entry.ts,
    }
    if turn is None:
        rec["status"] = "missing"
        rec["error"] = MISSING
        return rec
    rec.update(text=turn.text, conversation_id=turn.conversation_id, error=turn.error,
               status=entry.status or turn.status.value)
    if not turn.status.terminal:
        rec["error"] = NOT_FINISHED
    if turn.sentiment is not None:
        rec["label"] = turn.sentiment.label
        rec["confidence"] = round(turn.sentiment.confidence, 4)
    # Sentiment-only turns end with an empty reply: none, in the results. A chat reply is kept as is.
    rec["reply"] = None if sentiment_only else turn.reply
    return rec


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


class ErrorsWriter:
    """Bad rows as JSON Lines: ``{"line", "id", "reason"}``, flushed a chunk at a time."""

    def __init__(self, path: Path) -> None:
        self.f = path.open("w", encoding="utf-8")

    def write(self, bad: Iterable[BadRow]) -> None:
        for b in bad:
            self.f.write(json.dumps({"line": b.line, "id": b.input_id, "reason": b.reason}, ensure_ascii=False)
                         + "\n")
        self.f.flush()

    def __enter__(self) -> ErrorsWriter:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.f.close()
