"""Bulk jobs end to end: ``python -m producer bulk`` as a process, a real Redis, a real worker on the tiny model."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from producer.client import Producer
from worker.schemas import Status
from worker.settings import Settings
from worker.store import RedisStore
from worker.testing import PROJECT_ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tiny_worker, redis_base_url):
    store = RedisStore(redis.Redis.from_url(redis_base_url, decode_responses=True))
    yield tiny_worker, store, tiny_worker.env


def bulk(env, *args, stdin=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "producer", "bulk", *map(str, args)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, input=stdin, timeout=timeout)


def summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def feedback_lines(n: int, bad_every: int = 0) -> list[str]:
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append(f'{{"id": {i}, "text": ')  # broken JSON
        else:
            mood = "great, friendly staff" if i % 2 else "terrible, dirty room"
            lines.append(json.dumps({"id": i, "text": f"review {i}: {mood}", "ts": 1_700_000_000 + 3600 * i}))
    return lines


def test_jsonl_file_with_bad_rows_sentiment_only(stack, tmp_path):
    _, store, env = stack
    # Given a JSONL log with good rows and bad ones of each kind
    src = tmp_path / "log.jsonl"
    src.write_text("\n".join([
        json.dumps({"id": "a", "text": "The room was lovely", "ts": "2024-05-01T08:00:00Z"}),
        json.dumps({"id": "b", "text": ""}),
        '{"id": "c", "text": "unterminated',
        json.dumps({"id": "d", "text": ["not", "a", "string"]}),
        json.dumps({"id": "e", "text": "x" * 9000}),
        json.dumps({"id": "f", "text": "Breakfast was cold", "ts": "2024-05-01T09:00:00Z"}),
    ]) + "\n")
    out = tmp_path / "res.jsonl"
    # When it is back-processed, sentiment only, with a plot
    proc = bulk(env, src, "--out", out, "--sentiment-only", "--timestamp-field", "ts", "--plot",
                tmp_path / "p.png", "--batch-size", "2", "--timeout", "60")
    # Then one result per good row, in input order, labelled; bad rows beside with line and reason
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = jsonl(out)
    assert [(r["line"], r["id"], r["status"], r["reply"]) for r in res] == [(1, "a", "done", None),
                                                                           (6, "f", "done", None)]
    assert all(r["label"] in ("positive", "negative") and 0.5 <= r["confidence"] <= 1 for r in res)
    assert res[0]["text"] == "The room was lovely" and res[1]["ts"] == 1714554000
    errors = jsonl(tmp_path / "res.errors.jsonl")
    assert [(e["line"], e["id"]) for e in errors] == [(2, "b"), (3, None), (4, "d"), (5, "e")]
    assert [e["reason"].split(":")[0].split(" ")[0] for e in errors] == ["text", "broken", "text", "text"]
    assert "9000 characters long" in errors[3]["reason"]
    s = summary(proc)
    assert (s["good"], s["bad"], s["done"], s["positive"] + s["negative"]) == (2, 4, 2, 2)
    assert "bulk job summary" in proc.stderr and (tmp_path / "p.png").stat().st_size > 5000
    # the turns went through the bulk queue
    assert {t.queue for t in store.get_turns([r["message_id"] for r in res])} == {"bulk"}


def test_csv_file_with_replies_and_conversations(stack, tmp_path):
    _, store, env = stack
    src = tmp_path / "chat.csv"
    src.write_text('id,user,text\n1,u1,Hello there\n2,u2,\n3,u1,"And a second\nquestion"\n4,u2,oops,extra\n'
                   "5,u2,Is the pool open?\n")
    out = tmp_path / "chat.csv.out.csv"
    proc = bulk(env, src, "--out", out, "--conversation-field", "user", "--timeout", "90")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [(r["line"], r["id"], r["status"]) for r in rows] == [("2", "1", "done"), ("4", "3", "done"),
                                                                 ("7", "5", "done")]
    assert all(r["label"] in ("positive", "negative") for r in rows)
    turns = store.get_turns([r["message_id"] for r in rows])
    assert all(isinstance(t.reply, str) and t.reply == r["reply"] for t, r in zip(turns, rows, strict=True))
    errors = jsonl(tmp_path / "chat.csv.out.errors.jsonl")
    assert [(e["line"], e["reason"]) for e in errors] == [
        (3, "text is empty"), (6, "expected 3 fields (as the header), got 4")]
    # rows of one user are turns of one conversation, in input order; the second reply saw the first turn
    conv = store.get_conversation(rows[0]["conversation_id"])
    assert [t.text for t in conv.turns] == ["Hello there", "And a second\nquestion"]
    assert conv.turns[1].context == [conv.turns[0].message_id]


def test_stdin_input_is_sniffed_and_processed(stack, tmp_path):
    _, _, env = stack
    data = "\n".join(feedback_lines(5)) + "\nnot json\n"
    out = tmp_path / "stdin.jsonl"
    proc = bulk(env, "-", "--out", out, "--sentiment-only", "--job", "stdin-test", "--timeout", "60", stdin=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["line"] for r in jsonl(out)] == [1, 2, 3, 4, 5]
    assert jsonl(tmp_path / "stdin.errors.jsonl") == [
        {"line": 6, "id": None, "reason": "broken JSON at column 1: Expecting value"}]


def test_a_killed_run_resumes_to_exactly_one_result_per_good_row(stack, tmp_path):
    _, store, env = stack
    lines = feedback_lines(60, bad_every=7)
    good = [json.loads(x)["id"] for x in lines if x.endswith("}")]
    job = "resume-test"
    out = tmp_path / "r.jsonl"
    # Given a run fed through stdin that is killed (SIGKILL, no clean-up) after its first chunks were enqueued
    proc = subprocess.Popen([sys.executable, "-m", "producer", "bulk", "-", "--out", str(out), "--job", job,
                             "--sentiment-only", "--batch-size", "4", "--chunk-rows", "10"], cwd=PROJECT_ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdin is not None
    proc.stdin.write("\n".join(lines[:35]) + "\n")
    proc.stdin.flush()
    r = redis.Redis.from_url(env["ALLINONE_REDIS_URL"])
    turns = store.keys.turn(f"bulk:{job}:*")
    deadline = time.monotonic() + 60
    while len(list(r.scan_iter(turns))) < 20:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    stored_before = len(list(r.scan_iter(turns)))
    assert 20 <= stored_before < len(good)
    # When the same command runs again on the whole input
    again = bulk(env, "-", "--out", out, "--job", job, "--sentiment-only", "--batch-size", "4", "--timeout", "60",
                 stdin="\n".join(lines) + "\n")
    # Then every good row has exactly one result, done, and one turn; rows done before were not enqueued again
    assert again.returncode == 0, again.stderr[-3000:]
    res = jsonl(out)
    assert [int(x["id"]) for x in res] == good and all(x["status"] == "done" for x in res)
    assert len(list(r.scan_iter(turns))) == len(good)
    s = summary(again)
    assert s["already_done"] + s["enqueued"] == len(good) and s["enqueued"] >= len(good) - stored_before
    assert len(jsonl(tmp_path / "r.errors.jsonl")) == len(lines) - len(good)
    # a third run finds everything done: nothing is enqueued
    third = bulk(env, "-", "--out", out, "--job", job, "--sentiment-only", stdin="\n".join(lines) + "\n")
    assert summary(third)["enqueued"] == 0 and len(jsonl(out)) == len(good)


def test_an_interrupted_wait_resumes_without_enqueuing_again(stack, tmp_path):
    worker, store, env = stack
    src = tmp_path / "w.jsonl"
    src.write_text("\n".join(feedback_lines(8)) + "\n")
    out = tmp_path / "w.jsonl.out.jsonl"
    # Given a run stopped with Ctrl-C while it waits for results
    proc = subprocess.Popen([sys.executable, "-m", "producer", "bulk", str(src), "--out", str(out),
                             "--sentiment-only"], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    r = redis.Redis.from_url(env["ALLINONE_REDIS_URL"])
    deadline = time.monotonic() + 60
    while len(list(r.scan_iter(store.keys.turn("bulk:w-*")))) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err[-2000:]  # 0 if every row finished before the signal landed
    # When it is run again, Then it collects every row once
    again = bulk(env, src, "--out", out, "--sentiment-only", "--timeout", "60")
    assert again.returncode == 0 and len(jsonl(out)) == 8
    assert summary(again)["already_done"] + summary(again)["enqueued"] == 8


def test_a_live_message_overtakes_the_queued_bulk_backlog(stack, tmp_path):
    worker, store, env = stack
    src = tmp_path / "backlog.jsonl"
    n = 400
    src.write_text("\n".join(feedback_lines(n)) + "\n")
    out = tmp_path / "backlog.jsonl.out.jsonl"
    producer = Producer(settings=Settings(redis_url=env["ALLINONE_REDIS_URL"]))
    # Given a bulk backlog of many small tasks and, queued after all of it, one live message. The worker is
    # stopped meanwhile: a running worker may clear a backlog of the tiny model before a busy machine has
    # started the next process, and then nothing would be overtaken.
    assert worker.stop() is not None
    try:
        proc = bulk(env, src, "--out", out, "--sentiment-only", "--batch-size", "1", "--no-wait")
        assert proc.returncode == 0 and summary(proc)["enqueued"] == n
        mid = producer.submit("live-conv", "Is the restaurant open tonight?")
    finally:
        # When the worker starts on both queues
        worker.start()
    live = producer.wait(mid, timeout=60)
    # Then the live message is done (labelled and answered) first: at most the one bulk task taken in the same
    # instant goes before it (the worker polls live before bulk, one message at a time).
    assert live.status is Status.done and live.reply is not None
    job = summary(proc)["job"]
    mids = [f"bulk:{job}:i:{i}" for i in range(n)]
    turns = store.get_turns(mids)
    done_before = [t for t in turns if t.done_at is not None and t.done_at <= live.done_at]
    print(f"bulk rows done before the live message: {len(done_before)} of {n}; "
          f"live took {live.done_at - live.created_at:.2f} s from submission (worker restart included)")
    assert len(done_before) <= 1, f"{len(done_before)} bulk rows finished before the live message"
    # and the backlog finishes afterwards (collected by the same command without --no-wait; rows still queued
    # are enqueued again, and the worker skips the copy it reaches second)
    finish = bulk(env, src, "--out", out, "--sentiment-only", "--batch-size", "1", "--timeout", "120")
    s = summary(finish)
    assert finish.returncode == 0 and s["already_done"] + s["enqueued"] == n and s["done"] == n
    assert len(jsonl(out)) == n
    last_bulk = max(t.done_at for t in store.get_turns(mids))
    assert live.done_at < last_bulk
