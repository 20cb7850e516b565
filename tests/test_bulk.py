"""Bulk back-processing without a worker: parsing, ids, resume, results. MemoryStore and fakeredis stand in for
Redis; a fake sender stands in for the broker (and, where a test needs results, for the worker too)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import fakeredis
import pytest

from producer import bulk
from producer.__main__ import build_parser
from worker.errors import InvalidMessage
from worker.schemas import Sentiment, Status
from worker.settings import Settings
from worker.store import MemoryStore, RedisStore

MAX = 100


def rows_of(data: bytes, fmt: str = "jsonl", fields: bulk.Fields | None = None) -> list:
    reader = bulk.read_jsonl if fmt == "jsonl" else bulk.read_csv
    return list(reader(io.BytesIO(data), fields or bulk.Fields(), MAX))


class FakeSender:
    """Records what would go on the bulk queue; with ``worker`` set, also does the worker's job at once."""

    def __init__(self, store=None, worker: bool = False) -> None:
        self.store, self.worker = store, worker
        self.batches: list[list[str]] = []
        self.reply: list[bool] = []  # per batch: whether the worker is to send replies after it

    def _work(self, mids: list[str], reply: bool) -> None:
        if not self.worker:
            return
        for mid in mids:
            turn = self.store.get_turn(mid)
            if turn.status.terminal:
                continue
            label = "negative" if "bad" in turn.text else "positive"
            self.store.mark_classified(mid, Sentiment(label=label, confidence=0.9), "fake")
            self.store.mark_done(mid, f"re: {turn.text}" if reply else "", "fake")

    def send_batches(self, batches, reply=False):
        self.batches += [[p["message_id"] for p in b] for b in batches]
        self.reply += [reply] * len(batches)
        for b in batches:
            self._work([p["message_id"] for p in b], reply=reply)

    @property
    def sent(self) -> list[str]:
        return [m for b in self.batches for m in b]


def run_cli(tmp_path: Path, args: list[str], store, sender, capsys=None) -> tuple[int, dict]:
    a = build_parser().parse_args(["bulk", *args])
    code = bulk.cmd_bulk(a, store=store, sender=sender, settings=Settings(max_message_chars=MAX))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1]) if capsys else {}
    return code, summary


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ parsing


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


# -------------------------------------------------------------------------------------------------- ids


def test_message_ids_are_deterministic_and_readable():
    job = bulk.default_job("data/feedback.jsonl", "jsonl", bulk.Fields(), True)
    assert job == bulk.default_job("data/feedback.jsonl", "jsonl", bulk.Fields(), True)
    assert job.startswith("feedback-")
    # other options, another job: its rows never collide with this one's
    assert job != bulk.default_job("data/feedback.jsonl", "jsonl", bulk.Fields(), False)
    assert job != bulk.default_job("data/other.jsonl", "jsonl", bulk.Fields(), True)
    assert bulk.message_id("j", bulk.Row(7, "t", "42")) == "bulk:j:i:42"
    assert bulk.message_id("j", bulk.Row(7, "t")) == "bulk:j:L:7"
    odd = bulk.message_id("j", bulk.Row(7, "t", "an id with spaces"))
    assert odd.startswith("bulk:j:h:") and odd == bulk.message_id("j", bulk.Row(9, "u", "an id with spaces"))


def test_rows_are_their_own_conversation_unless_a_field_groups_them():
    assert bulk.conversation_id("j", bulk.Row(1, "t", "5")) == "bulk:j:i:5"
    assert bulk.conversation_id("j", bulk.Row(1, "t", "5", "u-9")) == "bulk:j:c:i:u-9"


# ----------------------------------------------------------------------------------------- enqueue, resume


@pytest.fixture(params=["memory", "fakeredis"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    return RedisStore(fakeredis.FakeRedis(decode_responses=True))


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("".join(x + "\n" for x in lines))
    return p


def test_sentiment_only_sends_one_batch_per_batch_size_rows_on_the_bulk_queue(tmp_path, store, capsys):
    src = write(tmp_path, "in.jsonl", [json.dumps({"id": i, "text": f"row {i}"}) for i in range(10)])
    sender = FakeSender()
    code, summary = run_cli(tmp_path, [str(src), "--out", str(tmp_path / "r.jsonl"), "--sentiment-only",
                                       "--batch-size", "4", "--no-wait"], store, sender, capsys)
    assert code == 0 and summary["enqueued"] == 10
    assert [len(b) for b in sender.batches] == [4, 4, 2] and sender.reply == [False] * 3
    turns = store.get_turns(sender.sent)
    assert all(t.queue == "bulk" and t.enqueued_at for t in turns)


def test_with_replies_rows_are_batched_too_and_the_worker_is_asked_to_reply(tmp_path, store, capsys):
    # Given rows of different lengths, each its own conversation
    texts = ["a much longer row than the others", "short", "a medium row", "tiny", "mid-size row"]
    src = write(tmp_path, "in.jsonl", [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)])
    sender = FakeSender()
    code, summary = run_cli(tmp_path, [str(src), "--out", str(tmp_path / "r.jsonl"), "--batch-size", "2",
                                       "--no-wait"], store, sender, capsys)
    # Then they go in classify_batch tasks that ask for replies, shortest first (less padding per batch)
    assert code == 0 and summary["enqueued"] == 5 and sender.reply == [True] * 3
    assert [[store.get_turn(m).text for m in b] for b in sender.batches] == [
        ["tiny", "short"], ["a medium row", "mid-size row"], ["a much longer row than the others"]]
    # Length is counted in UTF-8 bytes, which follow the token count across scripts: 14 CJK characters (about 10
    # tokens) go after 19 Latin ones (about 4 tokens), not before them
    mixed = ["服务很好，房间干净，早餐丰富。", "nice room and staff", "ok fine"]
    src = write(tmp_path, "mixed.jsonl", [json.dumps({"id": i, "text": t}, ensure_ascii=False)
                                          for i, t in enumerate(mixed)])
    sender = FakeSender()
    run_cli(tmp_path, [str(src), "--out", str(tmp_path / "m.jsonl"), "--batch-size", "3", "--no-wait"], store,
            sender, capsys)
    assert [store.get_turn(m).text for m in sender.batches[0]] == ["ok fine", "nice room and staff", mixed[0]]
    # but a conversation's turns keep their input order
    rows = [json.dumps({"id": i, "text": t, "c": "conv"}) for i, t in enumerate(texts)]
    sender = FakeSender()
    run_cli(tmp_path, [str(write(tmp_path, "conv.jsonl", rows)), "--out", str(tmp_path / "c.jsonl"),
                       "--conversation-field", "c", "--batch-size", "2", "--no-wait"], store, sender, capsys)
    assert [store.get_turn(m).text for b in sender.batches for m in b] == texts


def test_a_rerun_skips_done_rows_and_re_enqueues_unfinished_ones(tmp_path, store, capsys):
    # Given a job whose first run stored and enqueued every row, then stopped
    src = write(tmp_path, "in.jsonl", [json.dumps({"id": i, "text": f"row {i}"}) for i in range(6)])
    args = [str(src), "--out", str(tmp_path / "r.jsonl"), "--no-wait"]
    first = FakeSender()
    run_cli(tmp_path, args, store, first, capsys)
    # ... and the worker finished rows 0-2 (row 3 was classified, rows 4-5 never started)
    for mid in first.sent[:3]:
        store.mark_classified(mid, Sentiment(label="positive", confidence=0.9), "m")
        store.mark_done(mid, "ok", "m")
    store.mark_classified(first.sent[3], Sentiment(label="negative", confidence=0.9), "m")
    # When the same command runs again
    second = FakeSender()
    code, summary = run_cli(tmp_path, args, store, second, capsys)
    # Then only the unfinished rows are enqueued again, as the same turns (nothing twice)
    assert code == 0 and second.sent == first.sent[3:]
    assert summary["already_done"] == 3 and summary["enqueued"] == 3
    assert len({t.message_id for t in store.get_turns(first.sent)}) == 6


def test_end_to_end_results_in_input_order_with_errors_beside(tmp_path, store, capsys):
    # Given a JSONL log with bad rows and a worker that answers at once
    src = write(tmp_path, "log.jsonl", [
        json.dumps({"id": "a", "text": "lovely stay", "ts": "2024-03-01T10:00:00Z"}),
        "{broken",
        json.dumps({"id": "b", "text": "bad breakfast", "ts": "2024-03-01T11:30:00Z"}),
        json.dumps({"id": "c", "text": "   "}),
        json.dumps({"id": "d", "text": "fine", "ts": 1709290800}),
    ])
    out = tmp_path / "out" / "results.csv"
    code, summary = run_cli(tmp_path, [str(src), "--out", str(out), "--timestamp-field", "ts",
                                       "--plot", str(tmp_path / "p.png")], store, FakeSender(store, True), capsys)
    # Then results are in input order with labels and replies; bad rows are in the errors file
    assert code == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [(r["line"], r["id"], r["label"], r["status"], r["reply"]) for r in rows] == [
        ("1", "a", "positive", "done", "re: lovely stay"),
        ("3", "b", "negative", "done", "re: bad breakfast"),
        ("5", "d", "positive", "done", "re: fine"),
    ]
    errors = read_jsonl(out.with_name("results.errors.jsonl"))
    assert [(e["line"], e["reason"]) for e in errors] == [
        (2, "broken JSON at column 2: Expecting property name enclosed in double quotes"),
        (4, "text is empty"),
    ]
    assert summary["positive"] == 2 and summary["negative"] == 1 and summary["bad"] == 2
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert not list(out.parent.glob(".*spool")) and not out.with_name("results.csv.partial").exists()


def test_rows_of_a_conversation_are_its_turns_in_input_order(tmp_path, store, capsys):
    src = write(tmp_path, "c.csv", ["id,user,text", "1,u1,hi", "2,u2,hello", "3,u1,again"])
    sender = FakeSender(store, True)
    run_cli(tmp_path, [str(src), "--out", str(tmp_path / "r.jsonl"), "--conversation-field", "user", "--job",
                       "conv"], store, sender, capsys)
    u1 = store.get_conversation("bulk:conv:c:i:u1")
    assert [t.text for t in u1.turns] == ["hi", "again"] and [t.seq for t in u1.turns] == [0, 1]


def test_the_same_id_with_another_text_is_a_bad_row_not_a_crash(tmp_path, store, capsys):
    src = write(tmp_path, "d.jsonl", [json.dumps({"id": 1, "text": "one"}), json.dumps({"id": 1, "text": "two"})])
    out = tmp_path / "r.jsonl"
    code, summary = run_cli(tmp_path, [str(src), "--out", str(out)], store, FakeSender(store, True), capsys)
    assert code == 0 and summary["bad"] == 1 and len(read_jsonl(out)) == 1
    (err,) = read_jsonl(tmp_path / "r.errors.jsonl")
    assert err["line"] == 2 and "already submitted with another text" in err["reason"]


def test_unfinished_rows_are_written_as_they_stand_after_the_timeout(tmp_path, store, capsys):
    src = write(tmp_path, "t.jsonl", [json.dumps({"text": "never answered"})])
    out = tmp_path / "r.jsonl"
    code, summary = run_cli(tmp_path, [str(src), "--out", str(out), "--timeout", "0.3"], store, FakeSender(),
                            capsys)
    (rec,) = read_jsonl(out)
    assert code == 3 and summary["pending"] == 1
    assert rec["status"] == "queued" and "run the same command again" in rec["error"]


def test_gzip_input_is_read(tmp_path, store, capsys):
    p = tmp_path / "in.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    code, summary = run_cli(tmp_path, [str(p), "--out", str(tmp_path / "r.jsonl")], store, FakeSender(store, True),
                            capsys)
    assert code == 0 and summary["done"] == 1


def test_bad_options_are_refused(tmp_path, store):
    src = write(tmp_path, "in.jsonl", ["{}"])
    for args, msg in (([str(src), "--out", "r.txt"], "--out must end in"),
                      ([str(src), "--out", "r.jsonl", "--job", "a b"], "--job must be"),
                      ([str(tmp_path / "nope.jsonl"), "--out", "r.jsonl"], "no input file")):
        with pytest.raises(InvalidMessage, match=msg):
            run_cli(tmp_path, args, store, FakeSender())


def test_time_buckets_coarsen_to_stay_bounded():
    b = bulk.TimeBuckets(max_buckets=10)
    for i in range(100):
        b.add(1_700_000_000 + 60 * i, "positive")
    assert len(b.counts) <= 10 and sum(c["positive"] for c in b.counts.values()) == 100


def test_the_store_bulk_calls_behave_alike(store):
    out = store.create_turns([("c", "m1", "a"), ("c", "m2", "b"), ("c", "m1", "a"), ("c", "m2", "other")])
    assert [(o[0].seq, o[1]) for o in out[:3]] == [(0, True), (1, True), (0, False)]
    assert "another text" in str(out[3])
    store.mark_enqueued_many(["m1", "missing"])
    assert store.get_turn("m1").enqueued_at is not None
    assert store.get_statuses(["m1", "missing"]) == [Status.queued, None]
