"""The spool between the enqueue thread and the collector: one compact line per row, read as it grows."""

from __future__ import annotations

from pathlib import Path

from producer import bulk


def test_an_entry_is_one_compact_line_and_comes_back_the_same():
    # Given a row's entry, already marked finished by a collector
    entry = bulk.SpoolEntry(12, "a-7", "bulk:j:i:a-7", 1_700_000_000.5, status="done")
    # When it goes through the spool format
    line = entry.dumps()
    back = bulk.SpoolEntry.loads(line)
    # Then it is one short line, and comes back as it was written, unfinished (the status is the collector's)
    assert line == '[12,"a-7","bulk:j:i:a-7",1700000000.5]\n'
    assert back == bulk.SpoolEntry(12, "a-7", "bulk:j:i:a-7", 1_700_000_000.5) and back.status is None
    assert bulk.SpoolEntry.loads(bulk.SpoolEntry(3, None, "bulk:j:L:3", None).dumps()).input_id is None


def test_the_reader_leaves_a_line_being_written_for_the_next_read(tmp_path: Path):
    path = bulk.spool_path(tmp_path / "results.jsonl")
    assert path.name == ".results.jsonl.spool"
    path.write_bytes(b"")
    first, second = bulk.SpoolEntry(1, None, "m1", None), bulk.SpoolEntry(2, None, "m2", None)
    with bulk.SpoolWriter(path) as w, bulk.SpoolReader(path) as r:
        w.write([first])
        with path.open("a", encoding="utf-8") as raw:  # half of the next line, as a writer might leave it
            raw.write(second.dumps()[:5])
        assert r.read(10) == [first]
        with path.open("a", encoding="utf-8") as raw:
            raw.write(second.dumps()[5:])
        assert r.read(10) == [second] and r.read(10) == []


