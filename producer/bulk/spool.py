"""The spool: how the enqueue thread hands rows to the collector without either holding the whole input.

One compact line per good row, in input order, appended as each chunk is enqueued and read back by the
collector as it grows. It is a private file of one run (its format may change between versions), kept beside
RESULTS rather than in ``/tmp`` (often a tmpfs, and the spool grows with the input), and one per results file,
so that the spool of a crashed run is reused rather than left behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


@dataclass(slots=True)
class SpoolEntry:
    """One good row, as the collector needs it to find and write its result."""

    line: int
    input_id: str | None
    message_id: str
    ts: float | None
    # Set by the collector once the turn is finished ("done", "failed", or "missing"); never on disk.
    status: str | None = None

    def dumps(self) -> str:
        """The entry as one spool line: a JSON array, newline included."""
        data = [self.line, self.input_id, self.message_id, self.ts]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"

    @classmethod
    def loads(cls, line: str) -> SpoolEntry:
        n, input_id, message_id, ts = json.loads(line)
        return cls(n, input_id, message_id, ts)


def spool_path(results: Path) -> Path:
    """The spool of the run writing ``results``: ``.RESULTS.spool`` beside it."""
    return results.with_name(f".{results.name}.spool")


class SpoolWriter:
    """Appends entries, a chunk at a time, each chunk flushed so the collector sees it at once."""

    def __init__(self, path: Path) -> None:
        self.f = path.open("a", encoding="utf-8")

    def write(self, entries: list[SpoolEntry]) -> None:
        self.f.writelines(e.dumps() for e in entries)
        self.f.flush()

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.f.close()


class SpoolReader:
    """Reads entries as the writer appends them; a line still being written is left for the next read."""

    def __init__(self, path: Path) -> None:
        self.f = path.open("r", encoding="utf-8")

    def read(self, limit: int) -> list[SpoolEntry]:
        """Up to ``limit`` whole entries written since the last read."""
        out: list[SpoolEntry] = []
        while len(out) < limit:
            pos = self.f.tell()
            line = self.f.readline()
            if not line.endswith("\n"):
                self.f.seek(pos)
                break
            out.append(SpoolEntry.loads(line))
        return out

    def rest(self) -> Iterator[SpoolEntry]:
        """Every entry not read yet (once the writer has stopped)."""
        for line in self.f:
            yield SpoolEntry.loads(line)

    def __enter__(self) -> SpoolReader:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.f.close()
