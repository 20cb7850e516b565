"""Reading bulk input: good rows and bad rows with their line numbers, CSV quirks, timestamps, format sniffing."""

from __future__ import annotations

import io

import pytest

from producer import bulk
from worker.errors import InvalidMessage

MAX = 100


def rows_of(data: bytes, fmt: str = "jsonl", fields: bulk.Fields | None = None) -> list:
    reader = bulk.read_jsonl if fmt == "jsonl" else bulk.read_csv
    return list(reader(io.BytesIO(data), fields or bulk.Fields(), MAX))


def test_jsonl_bad_rows_are_reported_with_their_line_and_reason():
    # Given a JSONL file mixing good rows with every kind of bad one
    data = b"\n".join([
        b'{"id": 1, "text": "good one"}',
        b'{"id": 2, "text": ""}',
        b"not json at all",
        b"[1, 2]",
        b'{"id": 3, "text": 42}',
        b'{"id": 4}',
        b"",
        b'{"id": 5, "text": "' + b"x" * (MAX + 1) + b'"}',
        b'{"id": 6, "text": "bad bytes \xff\xfe here"}',
        b'{"id": [1], "text": "list id"}',
        b'{"text": "no id: keyed by its line"}',
    ]) + b"\n"
    # When it is read
    rows = rows_of(data)
    # Then good rows come out as rows, bad ones as reasons, all with their line numbers, in order
    got = [(r.line, r.reason if isinstance(r, bulk.BadRow) else "ok") for r in rows]
    assert got == [
        (1, "ok"),
        (2, "text is empty"),
        (3, "broken JSON at column 1: Expecting value"),
        (4, "a line must be a JSON object, got list"),
        (5, "text must be a string, got int"),
        (6, "no text (field 'text')"),
        (8, f"text is {MAX + 1} characters long; the limit is {MAX} (ALLINONE_MAX_MESSAGE_CHARS)"),
        (9, "text holds unpaired surrogates: not valid Unicode"),
        (10, "id field 'id' must be a string or an integer, got list"),
        (11, "ok"),
    ]
    assert rows[0].input_id == "1" and rows[-1].input_id is None


def test_a_line_over_the_byte_limit_is_skipped_without_being_read_whole():
    limit = bulk.line_limit(MAX)
    data = b'{"text": "a"}\n' + b"y" * (limit * 3) + b"\n" + b'{"text": "b"}\n'
    rows = rows_of(data)
    assert [(r.line, getattr(r, "reason", r.text if isinstance(r, bulk.Row) else None)) for r in rows] == [
        (1, "a"), (2, f"line is longer than {limit} bytes"), (3, "b"),
    ]


def test_csv_bad_rows_are_reported_with_their_line_and_reason():
    # Given a CSV with a BOM, a multi-line quoted text, short and broken rows
    data = (
        b"\xef\xbb\xbfid,text,conv\n"
        b"1,hello,c1\n"
        b'2,"two\nlines",c1\n'
        b"3,short\n"
        b"4,,c2\n"
        b'5,"bad"x,c2\n'
        b"6,fine,c3\n"
    )
    rows = rows_of(data, "csv", bulk.Fields(conversation="conv"))
    got = [(r.line, r.reason if isinstance(r, bulk.BadRow) else r.text) for r in rows]
    assert got == [
        (2, "hello"),
        (3, "two\nlines"),
        (5, "expected 3 fields (as the header), got 2"),
        (6, "text is empty"),
        (7, "broken CSV: ',' expected after '\"'"),
        (8, "fine"),
    ]
    assert [r.conversation for r in rows if isinstance(r, bulk.Row)] == ["c1", "c1", "c3"]


def test_csv_without_the_text_column_is_refused_up_front():
    with pytest.raises(InvalidMessage, match="no column 'body'"):
        rows_of(b"id,text\n1,a\n", "csv", bulk.Fields(text="body"))


def test_csv_without_an_id_column_keys_rows_by_line():
    rows = rows_of(b"text\nfirst\nsecond\n", "csv")
    assert [(r.line, r.input_id) for r in rows] == [(2, None), (3, None)]


def test_timestamps_epoch_millis_and_iso_are_read():
    assert bulk.parse_timestamp(1_700_000_000) == 1_700_000_000
    assert bulk.parse_timestamp(1_700_000_000_000) == 1_700_000_000
    assert bulk.parse_timestamp("2024-01-01T00:00:00Z") == 1704067200
    assert bulk.parse_timestamp("2024-01-01 00:00:00") == 1704067200
    assert bulk.parse_timestamp("yesterday") is None and bulk.parse_timestamp(True) is None


def test_format_is_taken_from_the_name_or_sniffed():
    assert bulk.sniff_format("a.jsonl", b"") == "jsonl" and bulk.sniff_format("a.csv.gz", b"{") == "csv"
    assert bulk.sniff_format("-", b'\xef\xbb\xbf {"text": 1}') == "jsonl"
    assert bulk.sniff_format("-", b"id,text") == "csv"
