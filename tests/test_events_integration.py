"""Event streams end to end, on a real Redis and real ``python -m worker`` processes on the tiny model: the order of
a turn's events, resuming by id, the CLI that follows a reply, and the ``restart`` a
reader hears when a worker is killed mid-reply and the broker hands the task to another."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from producer.client import Producer
from worker import events
from worker.settings import Settings
from worker.testing import PROJECT_ROOT, RedisServer, WorkerProcess, worker_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def producer(tiny_worker, redis_base_url) -> Producer:
    return Producer(settings=Settings(redis_url=redis_base_url))


def conv() -> str:
    return f"conv-{uuid.uuid4().hex[:8]}"


def test_a_turn_is_heard_in_order_queued_classified_tokens_done(producer):
    # Given a message submitted to a running worker
    mid = producer.submit(conv(), "The room was lovely")
    # When its events are followed from the first
    evs = list(producer.events(mid, timeout=60))
    # Then they come in order, each once, ending with done, which carries the stored reply
    kinds = [e.type for e in evs]
    assert kinds[:2] == ["queued", "classified"] and kinds[-1] == "done"
    assert set(kinds[2:-1]) == {"token"}
    ids = [e.id for e in evs]
    assert all(events.id_after(b, a) for a, b in zip(ids[:-1], ids[1:], strict=True))
    turn = producer.turn(mid)
    assert evs[1].data["label"] == turn.sentiment.label and evs[-1].data["reply"] == turn.reply
    assert "".join(e.data["text"] for e in evs if e.type == "token").strip() == turn.reply


def test_a_reader_resumes_after_any_event_it_saw(producer):
    mid = producer.submit(conv(), "hello again")
    every = list(producer.events(mid, timeout=60))
    for i, seen in enumerate(every):
        assert list(producer.events(mid, after=seen.id, timeout=10)) == every[i + 1 :] or i == len(every) - 1
    # after the last event there is nothing more: the follower ends at once instead of waiting
    t0 = time.monotonic()
    assert list(producer.events(mid, after=every[-1].id, timeout=10)) == []
    assert time.monotonic() - t0 < 1.0


def cli(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "producer", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )


def test_cli_send_follow_prints_the_sentiment_and_the_reply_as_it_is_written(producer, tiny_worker):
    c = conv()
    out = cli(tiny_worker.env, "send", "--follow", "-c", c, "The staff were friendly")
    assert out.returncode == 0, out.stderr
    first, sentiment, *_ = out.stdout.splitlines()
    mid = json.loads(first)["message_id"]
    turn = producer.turn(mid)
    assert sentiment == f"[{turn.sentiment.label} {turn.sentiment.confidence:.2f}]"
    assert out.stdout.split(sentiment + "\n", 1)[1].strip() == turn.reply
    # follow --json: every event, from any point
    events_out = cli(tiny_worker.env, "follow", mid, "--json")
    lines = [json.loads(line) for line in events_out.stdout.splitlines()]
    assert [e["type"] for e in lines][:2] == ["queued", "classified"] and lines[-1]["type"] == "done"
    rest = cli(tiny_worker.env, "follow", mid, "--json", "--after", lines[0]["id"])
    assert [json.loads(line) for line in rest.stdout.splitlines()] == lines[1:]
    assert cli(tiny_worker.env, "follow", "no-such-message").returncode == 4


def test_a_worker_killed_mid_reply_is_heard_as_restart_then_the_whole_new_reply(tiny_model_dir, tmp_path):
    # Given a worker writing a long reply, and a reader following it
    server = RedisServer().start()
    workers: list[WorkerProcess] = []
    try:
        env = worker_env(
            server.url, str(tiny_model_dir), tmp_path / "cache", ALLINONE_MAX_NEW_TOKENS="600",
            ALLINONE_REPLY_TIMEOUT_SECONDS="60", ALLINONE_VISIBILITY_TIMEOUT_SECONDS="4",
            ALLINONE_TOKEN_EVENT_SECONDS="0.05",
        )
        workers.append(WorkerProcess(env=env, log_path=tmp_path / "w1.log").start())
        producer = Producer(settings=Settings(redis_url=server.url))
        mid = producer.submit("c1", "a reply that is cut off")
        heard = []
        for event in producer.events(mid, timeout=60):
            heard.append(event)
            if event.type == "token":
                break
        # When the worker is killed (kill -9: no ack) right after its first tokens, and another takes over
        workers[0].kill()
        workers.append(WorkerProcess(env=env, log_path=tmp_path / "w2.log").start())
        heard += producer.events(mid, after=heard[-1].id, timeout=90)
    finally:
        for w in workers:
            w.kill()
        server.stop()
    # Then the reader hears: the partial reply, restart (attempt 2), the new reply from its start, done
    kinds = [e.type for e in heard]
    assert kinds[:3] == ["queued", "classified", "token"] and kinds[-1] == "done"
    assert kinds.count("restart") == 1 and kinds.count("done") == 1
    restart = kinds.index("restart")
    assert heard[restart].data == {"attempt": 2} and set(kinds[3:restart]) <= {"token"}
    # what the reader shows (the tokens after the restart) is the stored reply, not two attempts glued together
    rewritten = "".join(e.data["text"] for e in heard[restart:] if e.type == "token")
    assert rewritten.strip() == heard[-1].data["reply"]
