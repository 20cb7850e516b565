"""A bulk run without a worker: enqueue, resume, collect, results and errors files, through ``cmd_bulk`` as the
command line runs it. MemoryStore and fakeredis stand in for Redis; a fake sender stands in for the broker (and,
where a test needs results, for the worker too)."""

from __future__ import annotations

import gzip
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


def test_the_store_bulk_calls_behave_alike(store):
    out = store.create_turns([("c", "m1", "a"), ("c", "m2", "b"), ("c", "m1", "a"), ("c", "m2", "other")])
    assert [(o[0].seq, o[1]) for o in out[:3]] == [(0, True), (1, True), (0, False)]
    assert "another text" in str(out[3])
    store.mark_enqueued_many(["m1", "missing"])
    assert store.get_turn("m1").enqueued_at is not None
    assert store.get_statuses(["m1", "missing"]) == [Status.queued, None]


class RecordingProgress:
    """A Progress that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def enqueued(self, rows: int, bad: int) -> None:
        self.calls.append(("enqueued", (rows, bad)))

    def enqueue_ended(self, rows: int) -> None:
        self.calls.append(("enqueue_ended", (rows,)))

    def total_known(self, good: int) -> None:
        self.calls.append(("total_known", (good,)))

    def finished(self, n: int) -> None:
        self.calls.append(("finished", (n,)))

    def of(self, name: str) -> list[tuple[int, ...]]:
        return [args for n, args in self.calls if n == name]


def test_a_run_reports_its_progress_and_writes_results_in_input_order(tmp_path, store):
    # Given 7 rows (2 bad) read in chunks of 3, and a worker that answers at once
    lines = [json.dumps({"id": i, "text": f"row {i}"}) if i not in (2, 5) else "{broken" for i in range(7)]
    src = write(tmp_path, "in.jsonl", lines)
    config = bulk.JobConfig(job="p", fields=bulk.Fields(), sentiment_only=True, batch_size=2, queue="bulk",
                            errors_file=tmp_path / "e.jsonl", spool_path=tmp_path / "spool", chunk_rows=3)
    config.spool_path.write_bytes(b"")
    progress = RecordingProgress()
    job = bulk.BulkJob(config, store, FakeSender(store, worker=True), progress)
    writer = bulk.ResultsWriter(tmp_path / "r.jsonl", as_csv=False)
    # When the job runs (enqueue in a thread, collect here)
    with src.open("rb") as f:
        assert job.run(bulk.read_jsonl(f, bulk.Fields(), MAX), writer, timeout=10) is True
    writer.close()
    # Then the progress heard of every chunk, the end of enqueuing, the total to expect, and every finished row
    assert progress.of("enqueued") == [(3, 1), (3, 1), (1, 0)], progress.calls
    assert progress.of("enqueue_ended") == [(7,)], progress.calls
    assert set(progress.of("total_known")) == {(5,)}, progress.calls
    assert sum(n for (n,) in progress.of("finished")) == 5, progress.calls
    # and the results are the good rows, in input order; the bad ones are in the errors file
    assert [r["id"] for r in read_jsonl(tmp_path / "r.jsonl")] == ["0", "1", "3", "4", "6"]
    assert [e["line"] for e in read_jsonl(config.errors_file)] == [3, 6]


def test_without_a_progress_a_job_shows_nothing_and_still_runs(tmp_path, store):
    config = bulk.JobConfig(job="q", fields=bulk.Fields(), sentiment_only=True, batch_size=8, queue="bulk",
                            errors_file=tmp_path / "e.jsonl", spool_path=tmp_path / "spool")
    config.spool_path.write_bytes(b"")
    job = bulk.BulkJob(config, store, FakeSender())
    job.enqueue([bulk.Row(1, "hello", "a"), bulk.BadRow(2, "text is empty")])
    assert isinstance(job.progress, bulk.NoProgress) and job.enqueue_done.is_set()
    assert (job.tally.rows, job.tally.bad, job.tally.enqueued) == (2, 1, 1)
